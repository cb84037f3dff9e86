"""alpaca_eval_annotations from tatsu-lab/alpaca_eval: judge preference and lengths per answer.

Upstream: ``results/<model>/weighted_alpaca_eval_gpt4_turbo/annotations.json``, a JSON list of
``{instruction, dataset, output_1, generator_1 (the baseline), output_2, generator_2,
preference, ...}``. The answer texts are dropped; ``output_chars`` / ``baseline_chars`` are their
lengths. ``instruction_id`` numbers instructions in order of first appearance (models in name
order). Models that are not real submissions (NullModel, gpt4_gamed, the baseline itself) are
not in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from router_ml.data.build import BuildError, BuildReport, Source, raw_path, read_json

SUFFIX = "/weighted_alpaca_eval_gpt4_turbo/annotations.json"


def build(src: Source, raw_dir: Path, out: Path, exclude: frozenset[str], report: BuildReport) -> None:
    ids: dict[str, tuple[int, str]] = {}
    rows = []
    for raw in src.raw:
        if not (raw.path.startswith("results/") and raw.path.endswith(SUFFIX)):
            raise BuildError(f"alpaca_eval: unexpected raw file {raw.path!r}")
        model = raw.path[len("results/") : -len(SUFFIX)]
        data = read_json(raw_path(raw_dir, raw.path))
        if not isinstance(data, list):
            raise BuildError(f"{raw.path}: expected a JSON list of annotations")
        for k, rec in enumerate(data):
            if (
                not isinstance(rec, dict)
                or not {"instruction", "output_1", "output_2", "preference"} <= rec.keys()
            ):
                raise BuildError(f"{raw.path}[{k}]: expected instruction, output_1, output_2 and preference")
            text = rec["instruction"]
            if text in exclude:
                report.drop("excluded text")
                continue
            if text not in ids:
                ids[text] = (len(ids), rec.get("dataset"))
            rows.append(
                {
                    "instruction_id": ids[text][0],
                    "model": model,
                    "baseline": rec.get("generator_1"),
                    "preference": float(rec["preference"]),
                    "output_chars": len(rec["output_2"] or ""),
                    "baseline_chars": len(rec["output_1"] or ""),
                }
            )
    ins = pd.DataFrame(
        [{"instruction_id": i, "instruction": t, "dataset": d} for t, (i, d) in ids.items()]
    ).astype({"instruction_id": "int64"})
    prefs = pd.DataFrame(rows).astype(
        {"instruction_id": "int64", "output_chars": "int64", "baseline_chars": "int64"}
    )
    ins.to_parquet(out / "instructions.parquet", index=False)
    prefs.to_parquet(out / "model_preferences.parquet", index=False)
    report.rows.update({"instructions.parquet": len(ins), "model_preferences.parquet": len(prefs)})
