"""A fused inference forward for plain BERT encoders (MiniLM) on the CPU, checked against Hugging Face.

One QKV matmul per layer instead of three, weights pre-packed for oneDNN, GELU fused into the up
projection. ``fast_forward(net, tokenizer)`` returns it only when it reproduces ``net``'s own
forward on a probe batch (to 1e-4); otherwise ``net``'s forward is used.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Row count oneDNN packs the weights for; any value >= 8 picks the layout that is ~25% faster
#: than the 1-row layout on the ~20-row GEMMs of one short prompt, and ~5% on batches.
PACK_ROWS = 64
#: The private oneDNN ops the pre-packed linears use (pinned by tests/test_fused_ops.py).
PRIVATE_OPS = ("_reorder_linear_weight", "_linear_pointwise")


def _linear(weight: Any, bias: Any, prepacked: bool = True) -> Any:
    """``x (m, k) -> (m, n)`` linear, on weights pre-packed for oneDNN when this torch allows it
    (and ``prepacked``; else ``torch.nn.functional.linear``)."""
    import torch
    import torch.nn.functional as F

    w, b = weight.detach().contiguous(), bias.detach().contiguous()

    def public(x: Any, gelu: bool = False) -> Any:
        return F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b)

    public.prepacked = False  # type: ignore[attr-defined]
    if not prepacked:
        return public
    try:  # pre-packed oneDNN GEMM: faster than MKL, above all on the small matrices of one prompt
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        op = torch.ops.mkldnn._linear_pointwise

        def run(x: Any, gelu: bool = False) -> Any:
            return op(x, packed, b, "gelu" if gelu else "none", [], "none" if gelu else "")

        run(torch.zeros(2, w.shape[1]), gelu=True)  # probe the private op once
        run.prepacked = True  # type: ignore[attr-defined]
        return run
    except (AttributeError, RuntimeError, TypeError) as err:
        log.warning(
            "torch %s: the private ops torch.ops.mkldnn.%s failed (%s); the fused encoder runs on "
            "F.linear, correct but slower (see tests/test_fused_ops.py)",
            torch.__version__, " / ".join(PRIVATE_OPS), err,
        )  # fmt: skip
        return public


def fused_bert(net: Any, prepacked: bool = True) -> Any:
    """Inference forward of a CPU ``BertModel`` with fused QKV and pre-packed weights.

    Returns ``forward(input_ids (b, t), attention_mask (b, t), token_type_ids) -> (b, t, d)``, or
    None when ``net`` is not a plain absolute-position BERT encoder on the CPU. With ``keep``
    (sorted layer numbers, 0 = the embeddings, as Hugging Face's ``hidden_states``) it returns
    ``(last, [hidden state after each kept layer])``. ``prepacked=False``: public ops only
    (``F.linear``), for comparison (``experiments/bench_encoder_ops.py``).
    """
    import torch
    import torch.nn.functional as F

    cfg = net.config
    plain = (
        cfg.model_type == "bert"
        and cfg.hidden_act == "gelu"
        and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
        and not getattr(cfg, "is_decoder", False)
        and net.device.type == "cpu"
        and net.dtype == torch.float32
    )
    if not plain:
        return None
    emb, n_heads, eps = net.embeddings, cfg.num_attention_heads, cfg.layer_norm_eps
    layers = []
    for layer in net.encoder.layer:
        att = layer.attention
        q, k, v = att.self.query, att.self.key, att.self.value
        qkv = _linear(
            torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias]), prepacked
        )
        out, ln1 = _linear(att.output.dense.weight, att.output.dense.bias, prepacked), att.output.LayerNorm
        up = _linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias, prepacked)
        down, ln2 = (
            _linear(layer.output.dense.weight, layer.output.dense.bias, prepacked),
            layer.output.LayerNorm,
        )
        layers.append((qkv, out, ln1, up, down, ln2))

    def forward(
        input_ids: Any, attention_mask: Any, token_type_ids: Any = None, keep: tuple[int, ...] = ()
    ) -> Any:
        b, t = input_ids.shape
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = (
            emb.word_embeddings(input_ids)
            + emb.position_embeddings.weight[:t]
            + emb.token_type_embeddings(types)
        )
        x = emb.LayerNorm(x)  # (b, t, d)
        d = x.shape[-1]
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        kept = [x] if 0 in keep else []
        for i, (qkv, out, ln1, up, down, ln2) in enumerate(layers, start=1):
            h = qkv(x.view(b * t, d)).view(b, t, 3, n_heads, d // n_heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(h[0], h[1], h[2], attn_mask=mask)  # (b, heads, t, hd)
            a = out(a.transpose(1, 2).reshape(b * t, d)).view(b, t, d)
            x = F.layer_norm(a + x, (d,), ln1.weight, ln1.bias, eps)
            y = down(up(x.view(b * t, d), gelu=True)).view(b, t, d)
            x = F.layer_norm(y + x, (d,), ln2.weight, ln2.bias, eps)
            if i in keep:
                kept.append(x)
        return (x, kept) if keep else x

    return forward


def fast_forward(net: Any, tokenizer: Any) -> Any:
    """``features -> (b, t, d)`` hidden states: fused BERT when it matches ``net``, else ``net``.
    ``forward(features, keep)`` also returns the hidden states after the layers ``keep``.

    ``features`` is a dict of ``(b, t)`` int64 tensors (``input_ids``, ``attention_mask`` and,
    where the tokenizer gives them, ``token_type_ids``). The fused forward carries
    ``thread_safe = True``: several threads may run it at once (a Hugging Face forward may keep
    lazily filled caches, so it is run by one thread at a time).
    """
    import torch

    params = frozenset(inspect.signature(net.forward).parameters)

    def plain(feats: dict[str, Any], keep: tuple[int, ...] = ()) -> Any:
        args = {k: v.to(net.device) for k, v in feats.items() if k in params}
        out = net(**args, output_hidden_states=bool(keep))
        return (
            (out.last_hidden_state, [out.hidden_states[k] for k in keep]) if keep else out.last_hidden_state
        )

    fused = fused_bert(net)
    if fused is None:
        return plain

    def fast(feats: dict[str, Any], keep: tuple[int, ...] = ()) -> Any:
        return fused(feats["input_ids"], feats["attention_mask"], feats.get("token_type_ids"), keep)

    fast.thread_safe = True  # type: ignore[attr-defined]  # pure tensor ops on read-only weights
    probe = tokenizer(
        ["a short probe", "a somewhat longer probe sentence, padded"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        last, kept = fast(probe, (1,))
        ref_last, ref_kept = plain(probe, (1,))
        ok = torch.allclose(last, ref_last, atol=1e-4) and torch.allclose(kept[0], ref_kept[0], atol=1e-4)
    return fast if ok else plain  # self-check: never trade exactness for speed
