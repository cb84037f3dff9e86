"""What the proxy benchmarks share: the small router they serve, LiteLLM's venv, and server
processes started and stopped by PID (``bench_proxy``, ``bench_paired``, ``bench_faults``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benchmarks never download weights
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx

ROOT = Path(__file__).resolve().parents[1]
MASTER_KEY = "bench-master-key"  # LiteLLM needs one; a throwaway local value, not a secret
SMALL_ROUTER = {
    "name": "bench-simulated-knn",
    "seed": 0,
    "data": {"name": "simulated", "adapter": "simulated", "sources": ["project"], "options": {"seed": 0}},
    "encoder": {"type": "sentence_transformer", "model": "minilm"},
    "predictor": {"name": "knn", "params": {"k": 10}},
    "calibrator": {"name": "isotonic"},
    "task_head": {"params": {"class_weight": "balanced", "text_features": 4096, "view_words": 16}},
    "split": {"test_size": 0.2, "val_size": 0.1},
    "task_data": {},
}

#: quality heads the benchmarks can serve (``--head``)
BENCH_HEADS = ("knn", "taskmix", "mlp")


def small_router(head: str) -> dict:
    """The benchmark's router config: ``knn`` (k=10, the field's baseline; a scan of every training
    prompt per decision), ``taskmix`` (the head bench_core's evaluation picks) or ``mlp`` (the main
    job's default head), with the task head of ``conf/task_head/logistic.yaml`` for the last two."""
    if head == "knn":
        return SMALL_ROUTER
    if head not in BENCH_HEADS:
        raise ValueError(f"unknown bench head {head!r}; use one of {list(BENCH_HEADS)}")
    from omegaconf import OmegaConf

    task_head = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task_head" / "logistic.yaml"))
    return {
        **SMALL_ROUTER,
        "name": f"bench-simulated-{head}",
        "predictor": {"name": head, "task_key": "task", "params": {}},
        "task_head": {"params": task_head["params"]},
    }


def ensure_checkpoint(ckpt: str | None, head: str = "knn") -> Path:
    """The given checkpoint, or a small router trained once into outputs/bench/ckpt (knn) or
    outputs/bench/ckpt-<head> (one trained before checkpoints carried a policy fit set gains one)."""
    if ckpt:
        return Path(ckpt)
    run = ROOT / "outputs" / "bench" / ("ckpt" if head == "knn" else f"ckpt-{head}")
    if not (run / "checkpoint" / "router.json").is_file():
        from router_ml.training import train

        print(f"training a small {head} router into {run} ...", flush=True)
        train(small_router(head), run_dir=run)
    else:
        from router_ml.checkpoint import read_config
        from router_ml.export import add_policy_fit

        if read_config(run / "checkpoint").get("policy_fit") is None:
            print(f"adding the policy fit set to {run / 'checkpoint'} ...", flush=True)
            add_policy_fit(run / "checkpoint")
    return run / "checkpoint"


def ensure_litellm() -> Path | None:
    """``.venv-litellm/bin/litellm``, installed if missing; None (with a message) if it cannot be."""
    venv = ROOT / ".venv-litellm"
    exe = venv / "bin" / "litellm"
    if exe.is_file():
        return exe
    try:
        if not (venv / "bin" / "pip").is_file():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"LiteLLM skipped: cannot install 'litellm[proxy]' into {venv}: {e}", flush=True)
        return None
    return exe if exe.is_file() else None


class Proc:
    """A server subprocess, waited for on ``ready_url`` and stopped by its PID."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, log: Path, env: dict | None = None):
        self.name, self.ready_url, self.log = name, ready_url, log
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.ready_url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


@contextlib.contextmanager
def stopping(procs: dict[str, Proc]) -> Iterator[dict[str, Proc]]:
    """Stop every process in ``procs`` on the way out, newest first; on a failure print their log tails."""
    try:
        yield procs
    except BaseException:
        for p in procs.values():
            print(f"--- {p.name} log tail ---\n{p.log.read_text()[-2000:]}", file=sys.stderr)
        raise
    finally:
        for p in reversed(list(procs.values())):
            p.stop()


def litellm_proc(litellm: Path, model_list: str, router_settings: str, port: int, tmp: Path) -> Proc:
    """LiteLLM's proxy (started, not yet ready) with ``model_list`` / ``router_settings`` YAML bodies."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        f"model_list:\n{model_list}"
        f"general_settings:\n  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
        + (f"router_settings:\n{router_settings}" if router_settings else "")
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    cmd = [str(litellm), "--config", str(cfg), "--port", str(port), "--num_workers", "1"]
    return Proc("litellm", cmd, f"http://127.0.0.1:{port}/health/liveliness", tmp / "litellm.log", env=env)


def wait_ready(procs: dict[str, Proc]) -> None:
    """Wait for router-ml (required) and LiteLLM (dropped with a message if it does not come up)."""
    for name in ("router-ml", "litellm"):
        if name in procs:
            try:
                procs[name].wait_ready()
            except RuntimeError as e:
                if name == "router-ml":
                    raise
                print(f"LiteLLM skipped: {e}", flush=True)
                procs.pop(name).stop()
