"""The ``router-ml`` console entry point.

router-ml route --ckpt CHECKPOINT "Summarise this email ..."   # one decision, as JSON
router-ml route --ckpt CHECKPOINT --policy utility "..."       # with expected $ and latency
router-ml info CHECKPOINT                                      # what a checkpoint holds
router-ml train data=llmrouter predictor=knn                   # = python -m experiments.train ...
router-ml collect prompts=my_prompts.jsonl spend_cap_usd=2     # = python -m experiments.collect ...
router-ml serve --ckpt CHECKPOINT --backends conf/backends/local.yaml   # the OpenAI-compatible proxy
router-ml serve ... --keys-db .router-ml/keys.sqlite          # requests must carry a virtual API key
router-ml keys create alice --budget-usd 5 --period day --rpm 60 --tpm 100000 --models cheap --team ml
router-ml keys list | revoke alice | usage [alice]            # (--keys-db PATH or redis://... as serve's)
router-ml keys team ml --budget-usd 50 --period month         # a team budget on top of its keys' own
router-ml models up --backends conf/backends/local.yaml       # start the local vLLM / llama.cpp pool
router-ml models down                                         # stop it (its recorded process groups)
router-ml data list                                           # each public data set: source, size, present?
router-ml data fetch llmrouter                                # download its raw files, build into the cache
router-ml data build llmrouter --raw RAW_DIR --out OUT_DIR    # rebuild from upstream raw files
router-ml score answers.jsonl --out scored.parquet            # score answers (scorer per row's task)
router-ml score answers.jsonl --scorer judge_rubric --backends conf/backends/local.yaml --judge NAME
router-ml score --store outputs/collect/answers.sqlite         # score a collection store, in place
router-ml probe-set --ckpt CKPT --k 100 --from prompts.jsonl --out probes.jsonl   # prompts to run a new model on
router-ml add-model --ckpt CKPT --probes scores.jsonl --model NAME --out NEW_CKPT  # add it from their scores
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


def cmd_collect(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from router_ml.collect.runner import collect_from_config

    with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3"):
        cfg = compose(config_name="collect", overrides=overrides)
    print(json.dumps(collect_from_config(cfg), indent=2))
    return 0


def route_layer(router, policy: str, policy_dir: str | None = None):
    """The decision layer ``router-ml route --policy`` decides with, fitted on the router's policy fit
    set: priced and timed by the checkpoint's measured figures (a router trained on a collection
    store), else by list prices and latency priors (:meth:`ModelPool.from_data`)."""
    from router_ml.decision.costs import CostModel
    from router_ml.decision.latency import LatencyModel
    from router_ml.decision.layer import DecisionLayer
    from router_ml.decision.measured import MeasuredFigures
    from router_ml.decision.policies import build_policy
    from router_ml.decision.spec import ModelPool
    from router_ml.serving.engine_support import load_policy_configs

    configs = load_policy_configs(policy_dir)
    if policy not in configs:
        raise ValueError(f"unknown policy {policy!r}; known: {sorted(configs)}")
    built = build_policy(dict(configs[policy]))
    measured = MeasuredFigures.of_router(router)
    if measured is not None:
        layer = measured.decision_layer(built, router.models)
    else:
        pool = ModelPool.from_data(router.models)
        layer = DecisionLayer(built, pool, CostModel(pool), LatencyModel(pool))
    return layer.fit_router(router)


def cmd_route(args: argparse.Namespace) -> int:
    from router_ml.router import LearnedRouter

    router = LearnedRouter.from_pretrained(args.ckpt)
    layer = route_layer(router, args.policy, args.policy_dir) if args.policy else None
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for p in prompts:
        print(json.dumps(router.route(p, policy=layer).to_dict()))
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
    fit = cfg.get("policy_fit")  # its prompts stay in router.json
    summary = {k: fit.get(k) for k in ("source", "n_prompts")} if fit else None
    measured = cfg.get("measured")  # prices and latency measured in the training data, per model
    figures = {"source": measured["source"], "models": measured["models"]} if measured else None
    print(json.dumps({k: cfg.get(k) for k in keep} | {"policy_fit": summary, "measured": figures}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from router_ml.predictors.base import one_blas_thread_for_good
    from router_ml.serving.proxy import ProxySettings, build_engine, create_app, serve

    # Every BLAS product the proxy makes is one prompt or a micro-batch of a few: one thread, as
    # few_rows_blas would set per call anyway (set once here, those calls have nothing to switch)
    one_blas_thread_for_good()
    aliases = dict(a.split("=", 1) for a in args.alias)
    engine = build_engine(
        args.ckpt,
        args.backends,
        policy=args.policy,
        policy_dir=args.policy_dir,
        ledger=args.ledger,
        routing_log=args.routing_log,
        log_prompts=args.log_prompts,
        aliases=aliases,
        period=args.period,
        budget_usd=args.budget_usd,
        default_max_tokens=args.default_max_tokens,
        keys=args.keys_db,
    )
    app = create_app(engine, ProxySettings(api_key_env=args.api_key_env, max_body_bytes=args.max_body_bytes))
    serve(app, host=args.host, port=args.port)  # prints the address it listens on
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from router_ml.serving.keys import Team, key_usage, open_key_store

    with open_key_store(args.keys_db) as store:
        if args.action == "create":
            if not args.name:
                raise ValueError("router-ml keys create: name the key (router-ml keys create NAME ...)")
            models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
            key, secret = store.create_key(
                args.name, budget_usd=args.budget_usd, period=args.period or "day", rpm=args.rpm,
                tpm=args.tpm, models=models, team=args.team,
            )  # fmt: skip
            # the secret is shown this once: the store keeps only its hash
            print(json.dumps({"key": secret, **key.to_dict()}, indent=2))
            print("store the key now: it cannot be shown again", file=sys.stderr)
        elif args.action == "list":
            print(json.dumps({"keys": [k.to_dict() for k in store.list_keys()],
                              "teams": [t.to_dict() for t in store.list_teams()]}, indent=2))  # fmt: skip
        elif args.action == "revoke":
            if not args.name:
                raise ValueError("router-ml keys revoke: name the key (its name or id)")
            print(json.dumps(store.revoke(args.name).to_dict(), indent=2))
        elif args.action == "usage":
            keys = [store.get_key(args.name)] if args.name else store.list_keys()
            print(json.dumps([key_usage(store, k) for k in keys], indent=2))
        else:  # team
            if not args.name:
                raise ValueError("router-ml keys team: name the team")
            team = store.set_team(Team(args.name, args.budget_usd, args.period or "month"))
            print(json.dumps(team.to_dict(), indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from router_ml.backends.local.launcher import models_down, models_up

    if args.action == "up":
        from router_ml.backends.catalog import Catalog

        servers = models_up(Catalog.load(args.backends), args.names or None, timeout=args.timeout)
        for s in servers:
            print(json.dumps(s.record()))
    else:
        print(json.dumps({"stopped": models_down(args.names or None)}))
    return 0


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_data(args: argparse.Namespace) -> int:
    from router_ml.data import build, fetch

    if args.action == "list":
        print(
            f"{'name':<12} {'folder':<29} {'upstream (repo@revision)':<52} {'size':>8}  sha256 known  present"
        )
        for s in build.sources().values():
            known = sum(r.sha256 is not None for r in s.raw)
            print(
                f"{s.name:<12} {s.folder:<29} {s.repo + '@' + s.revision[:10]:<52} {_size(s.size_bytes):>8}  "
                f"{f'{known}/{len(s.raw)} raw':<12}  {fetch.where_present(s)}"
            )
        return 0
    if not args.name:
        raise ValueError(f"router-ml data {args.action}: name a data set ({', '.join(build.sources())})")
    try:
        src = build.get_source(args.name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    if args.action == "fetch":
        res = fetch.fetch(src.name, force=args.force)
        print(json.dumps({"source": res.source, "path": str(res.path), "downloaded": res.downloaded,
                          "rows": res.rows, "identical_to_reference": res.identical_to_reference}, indent=2))  # fmt: skip
        return 0
    raw = Path(args.raw) if args.raw else fetch.raw_dir(src)
    out = Path(args.out) if args.out else fetch.built_dir(src)
    exclude = build.read_exclude(args.exclude) if args.exclude else frozenset()
    report = build.build_source(src.name, raw, out, exclude=exclude)
    print(json.dumps({"source": src.name, "path": str(out), "rows": report.rows, "dropped": report.dropped,
                      "identical_to_reference": build.matches_reference(src, out)}, indent=2))  # fmt: skip
    return 0


def _read_table(path: Path):
    import pandas as pd

    from router_ml.data.jsonl import iter_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"{path}: answers file not found")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for where, _, value in iter_jsonl(path):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a JSON object per line")
            rows.append(value)
        return pd.DataFrame(rows)
    raise ValueError(f"{path}: answers must be a .jsonl or .parquet file")


def _scorer_factory(args: argparse.Namespace):
    """``(get_scorer, close)``: ``get_scorer(name)`` builds each scorer once (a judge through the
    catalog's :class:`~router_ml.backends.client.BackendClient`); ``close()`` closes that client."""
    from router_ml.scoring.registry import JUDGES, build_scorer

    client, built = None, {}

    def get_scorer(name: str):
        nonlocal client
        if name not in built:
            params = {"timeout_s": args.timeout} if name == "code" and args.timeout else {}
            if name in JUDGES:
                if not (args.backends and args.judge):
                    raise ValueError(f"scorer {name!r} needs --backends CATALOG and --judge BACKEND")
                from router_ml.backends.catalog import Catalog
                from router_ml.backends.client import BackendClient

                catalog = Catalog.load(args.backends)
                if args.judge not in catalog:
                    raise ValueError(f"--judge {args.judge!r} is not in the catalog {catalog.names}")
                client = client or BackendClient(catalog)
                params = {"client": client, "backend": args.judge, "verdict_format": args.verdict_format}
            built[name] = build_scorer(name, **params)
        return built[name]

    def close() -> None:
        judge = next((s for s in built.values() if s.name in JUDGES), None)
        if client is not None and judge is not None:
            judge.run(client.aclose())

    return get_scorer, close


def cmd_score(args: argparse.Namespace) -> int:
    from router_ml.scoring.cache import ScoreCache
    from router_ml.scoring.table import score_frame

    if bool(args.answers) == bool(args.store):
        raise ValueError("router-ml score: give an answers file or --store STORE (one of them)")
    get_scorer, close = _scorer_factory(args)
    cache = ScoreCache(args.cache) if args.cache else None
    if args.store:
        from router_ml.collect.scoring import score_store
        from router_ml.collect.store import AnswerStore

        if not Path(args.store).is_file():
            raise FileNotFoundError(f"store {args.store!r} not found")
        with AnswerStore(args.store) as store:
            try:
                summary = score_store(store, get_scorer, scorer=args.scorer, cache=cache)
            finally:
                close()
        print(json.dumps(summary, indent=2))
        return 0
    src = Path(args.answers)
    df = _read_table(src)
    try:
        out = score_frame(df, get_scorer, scorer=args.scorer, cache=cache, source=str(src))
    finally:
        close()
    dest = Path(args.out) if args.out else src.with_name(src.stem + ".scored.parquet")
    if dest.suffix == ".jsonl":
        out.to_json(dest, orient="records", lines=True, force_ascii=False)
    else:
        out.to_parquet(dest, index=False)
    summary = out.groupby("scorer").agg(rows=("score", "size"), mean_score=("score", "mean"),
                                        errors=("score_error", "count"), cost_usd=("score_cost_usd", "sum"))  # fmt: skip
    print(json.dumps({"path": str(dest), "by_scorer": summary.round(6).to_dict(orient="index")}, indent=2))
    return 0


def cmd_probe_set(args: argparse.Namespace) -> int:
    from router_ml.add_model import candidate_prompts, choose_probes
    from router_ml.router import LearnedRouter

    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".parquet", ".csv"):
        raise ValueError(f"probe-set: --out {str(out)!r} must end in .jsonl, .parquet or .csv")
    router = LearnedRouter.from_pretrained(args.ckpt)
    probes = choose_probes(router, candidate_prompts(router, args.from_), args.k)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        probes.to_json(out, orient="records", lines=True, force_ascii=False)
    elif out.suffix.lower() == ".parquet":
        probes.to_parquet(out, index=False)
    else:
        probes.to_csv(out, index=False)
    print(json.dumps({"out": str(out), "k": len(probes), "tasks": probes["task"].value_counts().to_dict()}))
    return 0


def cmd_add_model(args: argparse.Namespace) -> int:
    from router_ml.add_model import add_model_checkpoint

    report = add_model_checkpoint(
        args.ckpt,
        args.probes,
        args.model,
        args.out,
        input_price=args.input_price,
        output_price=args.output_price,
        ttft_s=args.ttft_s,
        tokens_per_s=args.tokens_per_s,
    )
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    if argv and argv[0] == "collect":
        try:
            return cmd_collect(argv[1:])
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad prompts, catalog, limits
            print(f"router-ml: error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="router-ml", description="A learned LLM router.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train a router (Hydra overrides follow)")
    sub.add_parser("collect", help="collect answers from a backend pool (Hydra overrides follow)")
    p_route = sub.add_parser("route", help="route prompts (arguments, or one per stdin line)")
    p_route.add_argument("--ckpt", required=True, help="checkpoint directory")
    p_route.add_argument(
        "--policy", default=None, help="decide with this policy (expected $ and latency from the checkpoint)"
    )
    p_route.add_argument("--policy-dir", default=None, help="folder of <policy>.yaml configs")
    p_route.add_argument("prompt", nargs="*")
    p_info = sub.add_parser("info", help="print a checkpoint's router.json summary")
    p_info.add_argument("ckpt")
    p_serve = sub.add_parser("serve", help="run the OpenAI-compatible routing proxy")
    p_serve.add_argument("--ckpt", required=True, help="checkpoint directory")
    p_serve.add_argument("--backends", required=True, help="backend catalog: a YAML file or a folder of them")
    p_serve.add_argument("--policy", default="utility", help="the policy behind model='router'")
    p_serve.add_argument(
        "--policy-dir", default=None, help="folder of <policy>.yaml configs (default: the package's own)"
    )
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument(
        "--ledger", default="sqlite:.router-ml/spend.sqlite", help="memory | sqlite:<path> | redis://..."
    )
    p_serve.add_argument("--period", default="day", help="budget period: session, hour, day, week, month")
    p_serve.add_argument(
        "--budget-usd", type=float, default=None,
        help="spend cap per --period over every request, routed or pass-through; clients cannot lift it",
    )  # fmt: skip
    p_serve.add_argument(
        "--default-max-tokens", type=int, default=1024,
        help="output cap written into a capped request that sets none (its cost bound must be real)",
    )  # fmt: skip
    p_serve.add_argument(
        "--routing-log", default=".router-ml/routing.jsonl", help="JSONL routing log ('' = none)"
    )
    p_serve.add_argument("--log-prompts", default="hash", choices=["full", "hash", "none"])
    p_serve.add_argument("--alias", action="append", default=[], help="ROUTER_MODEL=BACKEND (repeatable)")
    p_serve.add_argument(
        "--api-key-env", default=None, help="NAME of the env var holding the proxy's own key"
    )
    p_serve.add_argument("--max-body-bytes", type=int, default=512 * 1024)
    p_serve.add_argument(
        "--keys-db", default=None,
        help="virtual API key store (a path, sqlite:<path> or redis://...; see `router-ml keys`): "
        "requests must then carry one of its keys",
    )  # fmt: skip
    p_keys = sub.add_parser(
        "keys", help="create, list, revoke virtual API keys, show their usage, set team budgets"
    )
    p_keys.add_argument("action", choices=["create", "list", "revoke", "usage", "team"])
    p_keys.add_argument("name", nargs="?", help="the key's (or, for `team`, the team's) name")
    p_keys.add_argument(
        "--keys-db",
        default=".router-ml/keys.sqlite",
        help="the key store: a path, sqlite:<path> or redis://...",
    )
    p_keys.add_argument("--budget-usd", type=float, default=None, help="budget per --period (default: none)")
    p_keys.add_argument(
        "--period",
        default=None,
        help="budget period: hour, day, week, month (default: day for keys, month for teams)",
    )
    p_keys.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    p_keys.add_argument(
        "--tpm", type=int, default=None, help="tokens per minute, input + output (default: unlimited)"
    )
    p_keys.add_argument(
        "--models", default=None, help="comma-separated backends the key may use (default: all)"
    )
    p_keys.add_argument("--team", default=None, help="the key's team (its budget applies on top)")
    p_models = sub.add_parser("models", help="start or stop the local model servers of a catalog")
    p_models.add_argument("action", choices=["up", "down"])
    p_models.add_argument("names", nargs="*", help="backend names (default: every local backend)")
    p_models.add_argument("--backends", default="conf/backends/local.yaml")
    p_models.add_argument("--timeout", type=float, default=None, help="seconds to wait for each server")
    p_data = sub.add_parser("data", help="list, fetch or rebuild the public data sets")
    p_data.add_argument("action", choices=["list", "fetch", "build"])
    p_data.add_argument("name", nargs="?", help="data set: llmrouter, routerbench, ... (see `data list`)")
    p_data.add_argument("--force", action="store_true", help="fetch: download and build again")
    p_data.add_argument(
        "--raw", default=None, help="build: folder of upstream raw files (default: the cache's)"
    )
    p_data.add_argument("--out", default=None, help="build: output folder (default: the cache's)")
    p_data.add_argument("--exclude", default=None, help="build: JSONL of prompt texts to leave out")
    p_score = sub.add_parser(
        "score", help="score answers: JSONL / parquet of prompt, answer, reference, tests, task"
    )
    p_score.add_argument("answers", nargs="?", help="a .jsonl or .parquet file (or give --store)")
    p_score.add_argument(
        "--store", default=None, help="a collection store: score its answers into its scores table"
    )
    p_score.add_argument(
        "--scorer", default=None, help="one scorer for every row (default: by each row's task)"
    )
    p_score.add_argument(
        "--out", default=None, help="output .parquet or .jsonl (default: <answers>.scored.parquet)"
    )
    p_score.add_argument("--cache", default=".router-ml/scores.sqlite", help="score cache ('' = none)")
    p_score.add_argument("--timeout", type=float, default=None, help="code scorer: seconds per run")
    p_score.add_argument("--backends", default=None, help="judges: backend catalog (YAML file or folder)")
    p_score.add_argument("--judge", default=None, help="judges: the catalog backend that judges")
    p_score.add_argument("--verdict-format", default="text", choices=["text", "json_schema", "json_object"])
    p_probe = sub.add_parser("probe-set", help="choose informative probe prompts to run a new model on")
    p_probe.add_argument("--ckpt", required=True, help="checkpoint directory")
    p_probe.add_argument("--k", type=int, default=100, help="number of probe prompts")
    p_probe.add_argument(
        "--from", dest="from_", default=None,
        help="candidate prompts: .jsonl/.parquet/.csv with a 'prompt' column, or .txt (default: the training data set's)",
    )  # fmt: skip
    p_probe.add_argument("--out", required=True, help="where to write the probes (.jsonl, .parquet or .csv)")
    p_add = sub.add_parser("add-model", help="write a new checkpoint with a model added from probe scores")
    p_add.add_argument("--ckpt", required=True, help="checkpoint directory to add to (left unchanged)")
    p_add.add_argument(
        "--probes", required=True, help="probe table: prompt, score [, model, input_tokens, output_tokens, cost_usd, latency_s]"
    )  # fmt: skip
    p_add.add_argument("--model", required=True, help="name of the new model")
    p_add.add_argument("--out", required=True, help="new checkpoint directory")
    p_add.add_argument("--input-price", type=float, default=None, help="$ per 1M input tokens")
    p_add.add_argument("--output-price", type=float, default=None, help="$ per 1M output tokens")
    p_add.add_argument("--ttft-s", type=float, default=None, help="time to first token, seconds")
    p_add.add_argument("--tokens-per-s", type=float, default=None, help="decode speed, tokens per second")
    args = parser.parse_args(argv)
    commands = {
        "route": cmd_route,
        "info": cmd_info,
        "serve": cmd_serve,
        "keys": cmd_keys,
        "models": cmd_models,
        "data": cmd_data,
        "score": cmd_score,
        "probe-set": cmd_probe_set,
        "add-model": cmd_add_model,
    }
    try:
        return commands[args.cmd](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input, missing files, servers down
        print(f"router-ml: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
