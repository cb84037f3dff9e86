"""The private oneDNN ops of the fused encoder path, pinned (issue 13).

:mod:`router_ml.embeddings.fused_bert` runs MiniLM's linear layers on weights pre-packed by
``torch.ops.mkldnn._reorder_linear_weight`` and multiplied by ``torch.ops.mkldnn._linear_pointwise``:
private ops, kept because one prompt encodes 1.1-2x faster on them than on any public torch path
(``python -m experiments.bench_encoder_ops``; README "Libraries where they serve", where ONNX Runtime
is measured too). At run time a torch without them falls back to ``F.linear``, correct but slower,
with a warning. These tests fail loudly instead, naming the torch version and the op, so that a
torch upgrade cannot slow the proxy down unnoticed.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from router_ml.embeddings.fused_bert import PACK_ROWS, PRIVATE_OPS, _linear  # noqa: E402


def _broken(op: str, why: str) -> str:
    return (
        f"torch {torch.__version__}: torch.ops.mkldnn.{op} {why}. The fused encoder path "
        "(router_ml/embeddings/fused_bert.py) now falls back to F.linear and one-prompt encodes get "
        "slower: adapt _linear to this torch, or measure the public paths again "
        "(python -m experiments.bench_encoder_ops) and drop the private ops"
    )


@pytest.mark.parametrize("op", PRIVATE_OPS)
def test_the_private_ops_exist(op):
    assert hasattr(torch.ops.mkldnn, op), _broken(op, "is gone")


def test_the_private_ops_keep_their_signature_and_results():
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 32), torch.randn(48), torch.randn(5, 32)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
    except (AttributeError, RuntimeError, TypeError) as err:
        pytest.fail(_broken("_reorder_linear_weight", f"no longer takes (weight, {PACK_ROWS}): {err}"))
    for act, algo, ref in (("none", "", F.linear(x, w, b)), ("gelu", "none", F.gelu(F.linear(x, w, b)))):
        try:
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, act, [], algo)
        except (AttributeError, RuntimeError, TypeError) as err:
            pytest.fail(
                _broken(
                    "_linear_pointwise", f"no longer takes (x, packed, bias, {act!r}, [], {algo!r}): {err}"
                )
            )
        assert torch.allclose(got, ref, atol=1e-4), _broken(
            "_linear_pointwise", f"computes another {act!r} linear"
        )


def test_the_fused_path_runs_on_them():
    w, b = torch.randn(48, 32), torch.randn(48)
    assert _linear(w, b).prepacked, _broken(
        "_linear_pointwise", "could not be probed: _linear fell back to F.linear"
    )
