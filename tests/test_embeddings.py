"""Encoders and the embedding cache, with the real offline models (MiniLM, static) and real SQLite."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from router_ml.embeddings import (
    CachedEncoder,
    Encoder,
    SentenceTransformerEncoder,
    StaticEncoder,
    build_encoder,
    encode_cached,
)
from router_ml.embeddings.cache import DB_NAME, text_key
from router_ml.embeddings.fast_encode import encode_fast, pad_features, plan_batches
from router_ml.embeddings.sentence import packaged_minilm_path

REPO = Path(__file__).resolve().parent.parent
SIMILAR = ("How do I reverse a list in Python?", "What is the way to reverse a Python list?")
UNRELATED = "The weather in Paris is sunny and warm today."


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder()


@pytest.fixture(scope="module")
def static() -> StaticEncoder:
    return StaticEncoder()


def _llmrouter_prompts(shared_data: Path, n: int) -> list[str]:
    path = shared_data / "llmrouter_ulab" / "train.jsonl"
    with path.open() as f:
        rows = [json.loads(line) for _, line in zip(range(4000), f, strict=False)]
    return [r["prompt"] for r in rows[:: max(1, len(rows) // n)]][:n]


# ---------------------------------------------------------------------- sentence-transformers
def test_minilm_is_lazy_and_path_free() -> None:
    enc = SentenceTransformerEncoder()
    assert isinstance(enc, Encoder)
    assert (enc.id, enc.dim) == ("st:all-MiniLM-L6-v2", 384)  # dim from config files
    assert enc._st is None, "constructing or asking id/dim must not load the model"
    local = SentenceTransformerEncoder(model=str(packaged_minilm_path()), max_seq_length=128)
    assert local.id.startswith("st:model-") and local.id.endswith("@128")
    assert os.sep not in local.id.removeprefix("st:"), "an id must not carry a machine path"
    assert SentenceTransformerEncoder(normalize=False).id != enc.id


def test_minilm_encodes_unit_vectors_with_meaning(minilm: SentenceTransformerEncoder) -> None:
    X = minilm.encode([*SIMILAR, UNRELATED])
    assert X.shape == (3, 384) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    sim = X @ X.T
    assert sim[0, 1] > 0.7
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    assert minilm.encode([]).shape == (0, 384)


def test_fast_path_equals_sentence_transformers(
    minilm: SentenceTransformerEncoder, shared_data: Path
) -> None:
    prompts = _llmrouter_prompts(shared_data, 24)
    long_prompt = " ".join(["the router reads a very long prompt"] * 80)  # > 256 tokens: truncated
    texts = [*SIMILAR, UNRELATED, long_prompt, *prompts]
    pooled = SentenceTransformerEncoder(num_threads=3)  # 3 workers sharing the batches, any CPU
    for batch in ([texts[0]], [long_prompt], texts):  # one prompt (1 thread), padded batches
        ref = minilm.encode_sentence_transformers(batch, batch_size=8)
        np.testing.assert_allclose(minilm.encode(batch, batch_size=8), ref, atol=1e-5)
        np.testing.assert_allclose(pooled.encode(batch, batch_size=4), ref, atol=1e-5)
    assert minilm._fast is not None, "MiniLM must take the fast path"
    assert minilm._fast[1].__name__ == "fast", "MiniLM on the CPU must run the fused BERT forward"


def test_fast_path_batches_by_token_length(minilm: SentenceTransformerEncoder, shared_data: Path) -> None:
    """Batches hold rows of similar token counts, within the row and token caps, each row once."""
    minilm._load()
    assert minilm._fast is not None
    tok = minilm._fast[0]
    prompts = _llmrouter_prompts(shared_data, 60)
    lengths = np.array([len(ids) for ids in tok(prompts, truncation=True, max_length=256)["input_ids"]])
    batches = plan_batches(lengths, max_rows=8, max_tokens=600)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(prompts)))
    longest = [int(lengths[b].max()) for b in batches]
    assert longest == sorted(longest, reverse=True), "longest batches first"
    for b in batches:
        assert 1 <= len(b) <= 8 and (len(b) == 1 or len(b) * lengths[b].max() <= 600)
    # padding a batch by hand gives exactly what the tokenizer's own padding gives
    rows = [prompts[i] for i in batches[-1]] + [prompts[int(batches[0][0])]]
    enc = tok(rows, truncation=True, max_length=256)
    mine = pad_features(tok, {k: enc[k] for k in ("input_ids", "token_type_ids")})
    ref = tok(rows, truncation=True, max_length=256, padding=True, return_tensors="pt")
    assert set(mine) == set(ref) and all(bool((mine[k] == ref[k]).all()) for k in ref)


def test_fast_path_restores_threads_and_reports_worker_errors(minilm: SentenceTransformerEncoder) -> None:
    import torch

    before = torch.get_num_threads()
    minilm.encode([f"prompt number {i} about routing" for i in range(40)], batch_size=4)
    assert torch.get_num_threads() == before
    assert minilm._fast is not None
    tok = minilm._fast[0]

    def broken(feats):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"bad batch of {len(feats['input_ids'])}")

    with pytest.raises(RuntimeError, match="bad batch of"):
        encode_fast([f"text {i}" for i in range(20)], tok, broken, dim=384, max_length=32, workers=3)


@pytest.mark.parametrize("bad, index", [(["ok", ""], 1), (["   ", "ok"], 0), (["ok", "fine", None], 2)])
def test_bad_text_names_its_index(minilm: SentenceTransformerEncoder, bad: list, index: int) -> None:
    with pytest.raises(ValueError, match=f"index {index}"):
        minilm.encode(bad)


def test_missing_hub_model_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried: list = []

    def no_network(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise OSError("this test allows no network access")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = SentenceTransformerEncoder(model="no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        enc.encode(["hello"])
    assert tried == []  # failed at once: no look-up, no connection, nothing to wait for


# ---------------------------------------------------------------------- static
def test_static_encoder(static: StaticEncoder) -> None:
    assert (static.id, static.dim) == ("static:tokenlearn-static", 64)
    X = static.encode([*SIMILAR, UNRELATED])
    assert X.shape == (3, 64) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert X[0] @ X[1] > X[0] @ X[2]
    with pytest.raises(ValueError, match="index 0"):
        static.encode([""])


# ---------------------------------------------------------------------- build_encoder
def test_build_encoder_round_trip(minilm: SentenceTransformerEncoder, static: StaticEncoder) -> None:
    assert build_encoder("minilm").get_config() == minilm.get_config()
    for enc in (minilm, static):
        again = build_encoder(json.loads(json.dumps(enc.get_config())))  # what a checkpoint stores
        assert type(again) is type(enc) and again.id == enc.id and again.get_config() == enc.get_config()
    texts = [*SIMILAR, UNRELATED]
    np.testing.assert_array_equal(build_encoder(static.get_config()).encode(texts), static.encode(texts))


def test_build_encoder_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'bert-huge'.*minilm"):
        build_encoder("bert-huge")
    with pytest.raises(ValueError, match=r"unknown encoder type 'nope'"):
        build_encoder({"type": "nope"})
    with pytest.raises(ValueError, match=r"bad arguments for encoder type 'static'"):
        build_encoder({"type": "static", "colour": "red"})


# ---------------------------------------------------------------------- cache
class CountingEncoder:
    """The real encoder, counting the texts it is asked to encode."""

    def __init__(self, inner: Encoder) -> None:
        self.inner, self.id, self.dim, self.calls, self.texts = inner, inner.id, inner.dim, 0, []

    def encode(self, texts, batch_size=64, show_progress=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.texts += list(texts)
        return self.inner.encode(texts, batch_size, show_progress)

    def get_config(self) -> dict:
        return self.inner.get_config()


def test_cache_hits_and_order(minilm: SentenceTransformerEncoder, tmp_path: Path) -> None:
    counting = CountingEncoder(minilm)
    cached = CachedEncoder(counting, cache_dir=tmp_path)
    assert (cached.id, cached.dim, cached.get_config()) == (minilm.id, 384, minilm.get_config())
    texts = [SIMILAR[0], UNRELATED, SIMILAR[0], SIMILAR[1]]
    first = cached.encode(texts)
    assert counting.calls == 1 and sorted(counting.texts) == sorted(set(texts)), "duplicates encoded once"
    np.testing.assert_allclose(first, minilm.encode(texts), atol=1e-6)  # input order kept
    second = cached.encode(list(reversed(texts)))
    assert counting.calls == 1, "second call must be served from the cache"
    np.testing.assert_array_equal(second, first[::-1])
    cached.encode([*texts, "a brand new prompt"])
    assert counting.calls == 2 and counting.texts[-1] == "a brand new prompt"  # only the miss
    assert cached.count() == 4
    # a fresh wrapper (a later process) reads the same file; encode_cached goes through it too
    np.testing.assert_array_equal(CachedEncoder(minilm, cache_dir=tmp_path).encode(texts), first)
    np.testing.assert_array_equal(encode_cached("minilm", texts, cache_dir=tmp_path), first)


def test_cache_checks_dim_on_read(static: StaticEncoder, tmp_path: Path) -> None:
    cached = CachedEncoder(static, cache_dir=tmp_path)
    cached.encode(["hello"])
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # simulate an encoder that changed under its id
        db.execute(
            "UPDATE embeddings SET dim = 32, vector = ? WHERE text_sha256 = ?",
            [np.zeros(32, np.float32).tobytes(), text_key("hello")],
        )
    with pytest.raises(ValueError, match=r"32-dim vector .* has dim 64"):
        CachedEncoder(static, cache_dir=tmp_path).encode(["hello"])


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import router_ml.embeddings.cache as cache
    from router_ml.embeddings import CachedEncoder, StaticEncoder
    cache_dir, tag, n, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cache.WRITE_CHUNK = chunk
    enc = CachedEncoder(StaticEncoder(), cache_dir=cache_dir)
    enc.encoder.encode(["warm up"])
    Path(cache_dir, f"ready-{tag}").touch()
    while len(list(Path(cache_dir).glob("ready-*"))) < int(sys.argv[5]):
        time.sleep(0.01)
    for i in range(0, n, 100):  # n < 0: keep writing until killed
        enc.encode([f"prompt {j} about routing topic {j % 7}" for j in range(i, i + 100)])
        print(i + 100, flush=True)
    """
)


def _texts(n: int) -> list[str]:
    return [f"prompt {j} about routing topic {j % 7}" for j in range(n)]


def _writer(tmp_path: Path, tag: str, n: int, chunk: int, n_ready: int) -> subprocess.Popen:
    args = [sys.executable, "-c", WRITER, str(tmp_path), tag, str(n), str(chunk), str(n_ready)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_cache_survives_kill_mid_write(static: StaticEncoder, tmp_path: Path) -> None:
    proc = _writer(tmp_path, "a", n=10**9, chunk=7, n_ready=1)  # many small transactions
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if int(line) >= 1500:
                break
        proc.send_signal(signal.SIGKILL)  # while it is encoding / committing later chunks
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cached = CachedEncoder(static, cache_dir=tmp_path)
    n_written = cached.count()
    assert n_written >= 1500
    texts = _texts(n_written)
    found = cached.lookup([text_key(t) for t in texts])
    assert len(found) == n_written, "everything committed before the kill stays readable"
    np.testing.assert_allclose(np.stack([found[text_key(t)] for t in texts]), static.encode(texts), atol=1e-6)
    more = _texts(n_written + 50)
    np.testing.assert_allclose(cached.encode(more), static.encode(more), atol=1e-6)  # the cache goes on


def test_cache_two_concurrent_writers(static: StaticEncoder, tmp_path: Path) -> None:
    procs = [_writer(tmp_path, tag, n=1500, chunk=25, n_ready=2) for tag in ("a", "b")]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(out.split()[-1] == "1500" for out in outs)
    cached = CachedEncoder(static, cache_dir=tmp_path)
    assert cached.count() == 1500, "same texts from two writers are stored once"
    texts = _texts(1500)
    np.testing.assert_allclose(cached.encode(texts), static.encode(texts), atol=1e-6)


def _open_at(static: StaticEncoder, folder: str, start: float) -> None:
    while time.time() < start:  # all openers hit the new file in the same instant
        pass
    CachedEncoder(static, cache_dir=folder, timeout_s=10).lookup([text_key("x")])


def test_cache_many_processes_open_a_new_file_at_once(static: StaticEncoder, tmp_path: Path) -> None:
    """A new file's switch to WAL answers "locked" at once to the others; they must wait, not fail."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    failed = 0
    for round_ in range(25):
        folder = str(tmp_path / f"r{round_}")
        start = time.time() + 0.2
        procs = [ctx.Process(target=_open_at, args=(static, folder, start)) for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        failed += sum(proc.exitcode != 0 for proc in procs)
    assert failed == 0, f"{failed} of 100 concurrent opens failed"
