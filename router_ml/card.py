"""The model card (README.md) written into every checkpoint, from its router.json."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _fit_set(fit: dict[str, Any] | None) -> str:
    if not fit:
        return "none (a proxy cannot fit its policies on this checkpoint; re-export it)"
    return f"{fit.get('n_prompts', '?')} prompts ({fit.get('source') or 'source not recorded'}), predicted quality and task"


def model_card(config: dict[str, Any]) -> str:
    """Render a markdown model card: what the router routes between, how it was trained, its metrics."""
    enc = config.get("encoder", {})
    qh = config.get("quality_head", {})
    th = config.get("task_head", {})
    cal = config.get("calibrator") or {}
    training = config.get("training", {})
    lines = [
        "---",
        "library_name: router-ml",
        "tags: [llm-routing, router-ml]",
        "---",
        "",
        f"# router-ml checkpoint: {config.get('name', 'router')}",
        "",
        "A learned LLM router: it embeds a prompt, predicts its task type and the expected quality of",
        "each candidate model, and routes to one of them. Load it with:",
        "",
        "```python",
        "from router_ml import LearnedRouter",
        'router = LearnedRouter.from_pretrained("path/to/this/folder")',
        'router.route("Summarise this email in two bullet points: ...")',
        "```",
        "",
        "## Components",
        f"- Encoder: `{enc.get('id', '?')}` ({enc.get('dim', '?')}-dim)",
        f"- Task head: `{th.get('type', '?')}` over {', '.join(config.get('task_labels', []))}",
        f"- Quality head: `{qh.get('type', '?')}` with params `{qh.get('params', {})}`",
        f"- Calibration: `{cal.get('type', 'none')}`",
        f"- Policy fit set: {_fit_set(config.get('policy_fit'))}",
        "",
        "## Candidate models (column order)",
        "",
    ]
    lines += [f"{i}. `{m}`" for i, m in enumerate(config.get("models", []))]
    for added in config.get("added_models", []):
        lines += [
            "",
            f"`{added['name']}` was added from {added['n_probes']} probe prompts"
            + (f" (`{added['probes']}`)" if added.get("probes") else "")
            + f", without retraining the others: {added['method']}.",
        ]
    lines += ["", "## Training data", ""]
    if training:
        lines += [f"- {k}: {_fmt(v)}" for k, v in training.items()]
    else:
        lines.append("- not recorded")
    metrics = config.get("metrics", {})
    lines += ["", "## Metrics (held-out split unless the key says otherwise)", ""]
    if training.get("refit"):
        lines += [
            "These were measured on a router fitted on the split's training part; this checkpoint has",
            "the same hyper-parameters refitted on every labelled prompt, so no held-out figure of its",
            "own exists (see `refit` above).",
            "",
        ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No metrics recorded.")
    lines += [
        "",
        "## Limitations",
        "",
        "Predicted quality is only as good as the routing data behind it: scores are benchmark outcomes",
        "(exact match, unit tests, judge preferences) on the data set named above, and transfer to other",
        "prompt distributions is not guaranteed. Check the out-of-distribution figures before relying on it.",
        "",
        f"Schema version {config.get('schema_version', '?')}; written by router-ml "
        f"{config.get('package_versions', {}).get('router-ml', '?')}.",
        "",
    ]
    return "\n".join(lines)
