"""One-prompt encode latency of MiniLM by forward implementation (issue 13: private torch ops or not).

    python -m experiments.bench_encoder_ops                    # 5 rounds of 60 calls per variant
    python -m experiments.bench_encoder_ops --rounds 3 --repeats 30

What the proxy feels is the encoder's time for ONE prompt. Measured call by call, the variants in
turn (the machine is shared: every variant sees the same background load), p50 ms per call on one
thread of
``SentenceTransformerEncoder``-equivalent vectors (mean pooling, unit norm) for a short and a
~200-word prompt:

- ``fused (mkldnn)``: the shipped path, :func:`~router_ml.embeddings.fused_bert.fused_bert` with
  weights pre-packed by the private ``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise`` ops;
- ``fused (public)``: the same fused forward on ``torch.nn.functional.linear`` (public API only);
- ``HF forward``: the fast encode path on Hugging Face's own ``BertModel`` forward;
- ``ST.encode``: plain ``SentenceTransformer.encode``;
- ``onnxruntime``: the model exported with ``torch.onnx.export`` and run by an ONNX Runtime
  ``InferenceSession`` (one intra-op thread): the engine under sentence-transformers'
  ``backend="onnx"``, whose own wrapper (optimum) is skipped with a note when it is not
  installable (it pins transformers and huggingface_hub). Skipped if onnxruntime is missing.

Each variant's vectors are checked against ``ST.encode``'s (max abs difference printed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from experiments.bench_encoders import SHORT, llmrouter_prompts, long_prompt


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def variants(tmp: Path) -> tuple[dict[str, Callable[[str], np.ndarray]], list[str]]:
    """name -> ``encode(one text) -> (1, dim)``, and notes on what was skipped."""
    import torch

    from router_ml.embeddings import SentenceTransformerEncoder
    from router_ml.embeddings.fast_encode import encode_fast
    from router_ml.embeddings.fused_bert import fused_bert

    torch.set_num_threads(1)
    enc = SentenceTransformerEncoder()
    st = enc._load()
    tok, _, _ = enc._fast
    net = st[0].auto_model
    notes: list[str] = []

    def via(forward: Callable) -> Callable[[str], np.ndarray]:
        return lambda text: encode_fast([text], tok, forward, dim=enc.dim, max_length=enc.max_seq_length,
                                        batch_size=1, normalize=True, workers=1)  # fmt: skip

    def fused(prepacked: bool) -> Callable:
        f = fused_bert(net, prepacked=prepacked)
        return lambda feats, keep=(): f(
            feats["input_ids"], feats["attention_mask"], feats.get("token_type_ids"), keep
        )

    def hf(feats: dict, keep: tuple = ()) -> object:
        return net(**feats).last_hidden_state

    out = {
        "fused (mkldnn)": via(fused(True)),
        "fused (public)": via(fused(False)),
        "HF forward": via(hf),
        "ST.encode": lambda text: enc.encode_sentence_transformers([text]),
    }
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("onnxruntime: not installed (pip install onnxruntime onnx)")
        return out, notes
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        notes.append("sentence-transformers backend='onnx' needs optimum, not installed: its engine, "
                     "onnxruntime, is measured directly")  # fmt: skip
    path = tmp / "minilm.onnx"
    probe = tok(["a probe sentence"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class Hidden(torch.nn.Module):  # keyword arguments in, last hidden state out
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ):
            out = self.net(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Hidden(), (probe["input_ids"], probe["attention_mask"], probe["token_type_ids"]),
                          str(path), input_names=names, output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={n: {0: "b", 1: "t"} for n in names}, dynamo=False)  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def onnx(text: str) -> np.ndarray:
        feats = tok([text], truncation=True, max_length=enc.max_seq_length, return_tensors="np")
        hidden = sess.run(None, {n: feats[n].astype(np.int64) for n in names})[0]
        mask = feats["attention_mask"][..., None]
        return _unit((hidden * mask).sum(1) / mask.sum(1))

    out["onnxruntime"] = onnx
    return out, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds over the prompts")
    ap.add_argument("--repeats", type=int, default=60, help="calls per variant, prompt and round")
    args = ap.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    texts = {"short": SHORT, "long": long_prompt(llmrouter_prompts(500))}
    with tempfile.TemporaryDirectory() as tmp:
        fns, notes = variants(Path(tmp))
        for note in notes:
            print("note:", note)
        ref = {k: fns["ST.encode"](t) for k, t in texts.items()}
        for name, fn in fns.items():
            diff = max(float(np.abs(fn(t) - ref[k]).max()) for k, t in texts.items())
            print(f"{name:<16} max |vector - ST.encode| = {diff:.1e}")
        times: dict[tuple[str, str], list[float]] = {}
        for fn in fns.values():  # warm-up
            for text in texts.values():
                for _ in range(3):
                    fn(text)
        for r in range(args.rounds):
            for kind, text in texts.items():
                for i in range(args.repeats):  # call by call, each variant in turn (order alternating)
                    order = list(fns.items()) if (r + i) % 2 == 0 else list(reversed(fns.items()))
                    for name, fn in order:
                        t0 = time.perf_counter()
                        fn(text)
                        times.setdefault((name, kind), []).append(time.perf_counter() - t0)
    print(f"\none-prompt encode, 1 thread, p50 ms ({args.rounds} rounds x {args.repeats} calls; "
          f"short {len(SHORT.split())} words, long {len(texts['long'].split())} words)")  # fmt: skip
    # the calls of one iteration ran back to back: the median of their ratios is the paired figure
    base = {k: np.asarray(times[("fused (mkldnn)", k)]) for k in texts}
    print(f"  {'forward':<16}{'short':>9}{'long':>9}{'short / fused':>15}{'long / fused':>14}  (paired)")
    for name in fns:
        p = {k: float(np.median(times[(name, k)])) * 1e3 for k in texts}
        r = {k: float(np.median(np.asarray(times[(name, k)]) / base[k])) for k in texts}
        print(f"  {name:<16}{p['short']:>9.2f}{p['long']:>9.2f}{r['short']:>15.2f}{r['long']:>14.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
