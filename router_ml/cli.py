"""The ``router-ml`` console entry point.

router-ml route --ckpt CHECKPOINT "Summarise this email ..."   # one decision, as JSON
router-ml info CHECKPOINT                                      # what a checkpoint holds
router-ml train data=llmrouter predictor=knn                   # = python -m experiments.train ...
router-ml serve --ckpt CHECKPOINT --backends conf/backends/local.yaml   # the OpenAI-compatible proxy
router-ml models up --backends conf/backends/local.yaml       # start the local vLLM / llama.cpp pool
router-ml models down                                         # stop it (by the recorded PIDs)
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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from router_ml.predictors.base import one_blas_thread_for_good
    from router_ml.serving.proxy import ProxySettings, build_engine, create_app

    # Every BLAS product the proxy makes is one prompt or a micro-batch of a few: one thread, as
    # few_rows_blas would set per call anyway (set once here, those calls have nothing to switch)
    one_blas_thread_for_good()
    aliases = dict(a.split("=", 1) for a in args.alias)
    engine = build_engine(
        args.ckpt,
        args.backends,
        policy=args.policy,
        ledger=args.ledger,
        routing_log=args.routing_log,
        log_prompts=args.log_prompts,
        aliases=aliases,
        period=args.period,
    )
    app = create_app(engine, ProxySettings(api_key_env=args.api_key_env, max_body_bytes=args.max_body_bytes))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from router_ml.serving.launcher import models_down, models_up

    if args.action == "up":
        from router_ml.serving.catalog import Catalog

        servers = models_up(Catalog.load(args.backends), args.names or None, timeout=args.timeout)
        for s in servers:
            print(json.dumps(s.record()))
    else:
        print(json.dumps({"stopped": models_down(args.names or None)}))
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
    p_serve = sub.add_parser("serve", help="run the OpenAI-compatible routing proxy")
    p_serve.add_argument("--ckpt", required=True, help="checkpoint directory")
    p_serve.add_argument("--backends", required=True, help="backend catalog: a YAML file or a folder of them")
    p_serve.add_argument("--policy", default="utility", help="the policy behind model='router'")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument(
        "--ledger", default="sqlite:.router-ml/spend.sqlite", help="memory | sqlite:<path> | redis://..."
    )
    p_serve.add_argument("--period", default="day", help="budget period: session, hour, day, week, month")
    p_serve.add_argument(
        "--routing-log", default=".router-ml/routing.jsonl", help="JSONL routing log ('' = none)"
    )
    p_serve.add_argument("--log-prompts", default="hash", choices=["full", "hash", "none"])
    p_serve.add_argument("--alias", action="append", default=[], help="ROUTER_MODEL=BACKEND (repeatable)")
    p_serve.add_argument(
        "--api-key-env", default=None, help="NAME of the env var holding the proxy's own key"
    )
    p_serve.add_argument("--max-body-bytes", type=int, default=512 * 1024)
    p_models = sub.add_parser("models", help="start or stop the local model servers of a catalog")
    p_models.add_argument("action", choices=["up", "down"])
    p_models.add_argument("names", nargs="*", help="backend names (default: every local backend)")
    p_models.add_argument("--backends", default="conf/backends/local.yaml")
    p_models.add_argument("--timeout", type=float, default=None, help="seconds to wait for each server")
    args = parser.parse_args(argv)
    try:
        return {"route": cmd_route, "info": cmd_info, "serve": cmd_serve, "models": cmd_models}[args.cmd](
            args
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input, missing files, servers down
        print(f"router-ml: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
