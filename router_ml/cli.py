"""The ``router-ml`` console entry point.

router-ml route --ckpt CHECKPOINT "Summarise this email ..."   # one decision, as JSON
router-ml info CHECKPOINT                                      # what a checkpoint holds
router-ml train data=llmrouter predictor=knn                   # = python -m experiments.train ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _conf_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "conf"
    if not path.is_dir():
        raise SystemExit(f"router-ml: config folder {str(path)!r} not found (install the repo with pip -e)")
    return path


def cmd_train(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from router_ml.training import train

    with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run_dir = Path(cfg.get("run_dir") or f"outputs/train/cli_{cfg.name}")
    metrics = train(cfg, run_dir=run_dir)
    print(json.dumps({"run_dir": str(run_dir), **metrics}, indent=2))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from router_ml.router import LearnedRouter

    router = LearnedRouter.from_pretrained(args.ckpt)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for p in prompts:
        print(json.dumps(router.route(p).to_dict()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from router_ml.checkpoint import read_config

    cfg = read_config(args.ckpt)
    keep = (
        "name",
        "schema_version",
        "encoder",
        "models",
        "task_labels",
        "quality_head",
        "calibrator",
        "metrics",
    )
    print(json.dumps({k: cfg.get(k) for k in keep}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    parser = argparse.ArgumentParser(prog="router-ml", description="A learned LLM router.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train a router (Hydra overrides follow)")
    p_route = sub.add_parser("route", help="route prompts (arguments, or one per stdin line)")
    p_route.add_argument("--ckpt", required=True, help="checkpoint directory")
    p_route.add_argument("prompt", nargs="*")
    p_info = sub.add_parser("info", help="print a checkpoint's router.json summary")
    p_info.add_argument("ckpt")
    args = parser.parse_args(argv)
    try:
        return {"route": cmd_route, "info": cmd_info}[args.cmd](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"router-ml: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
