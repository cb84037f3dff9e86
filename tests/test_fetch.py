"""Fetchers against a local HTTP server on 127.0.0.1 (never the internet).

Real downloads through httpx, sha256 checks (a corrupted file is refused and not cached), a cache
hit makes no request, a cut transfer resumes with an HTTP Range request, offline fails at once.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from router_ml.data.build import BuiltFile, RawFile, Source, get_source
from router_ml.data.fetch import ChecksumError, FetchError, fetch_raw, raw_dir


class _Handler(BaseHTTPRequestHandler):
    server: _FileServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in srv.cut_once:  # announce the whole body, send half, hang up
            srv.cut_once.discard(self.path)
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body[start:])


class _FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = _FileServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ROUTER_ML_FETCH_BASE_URL", srv.url)
    monkeypatch.setenv("ROUTER_ML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ROUTER_ML_OFFLINE", raising=False)
    yield srv
    srv.shutdown()
    srv.server_close()


BODY = bytes(range(256)) * 4096  # 1 MiB


def _source(sha256: str | None) -> Source:
    return Source(
        name="toy",
        folder="toy_source",
        repo="org/repo",
        revision="0" * 40,
        licence="-",
        raw=(RawFile("data/raw.bin", sha256),),
        built=(BuiltFile("raw.bin", len(BODY), hashlib.sha256(BODY).hexdigest()),),
    )


def _serve(server: _FileServer, body: bytes = BODY) -> str:
    path = "/org/repo/" + "0" * 40 + "/data/raw.bin"
    server.files[path] = body
    return path


def test_download_checks_sha256_and_second_call_is_a_cache_hit(server):
    path = _serve(server)
    src = _source(hashlib.sha256(BODY).hexdigest())
    root = fetch_raw(src)
    assert (root / "data/raw.bin").read_bytes() == BODY
    assert server.log == [(path, None)]
    fetch_raw(src)
    assert len(server.log) == 1  # nothing requested the second time


def test_corrupted_file_is_refused_and_not_cached(server):
    _serve(server, BODY[:-1] + b"X")
    src = _source(hashlib.sha256(BODY).hexdigest())
    with pytest.raises(ChecksumError, match=r"sha256 [0-9a-f]{64} does not match the pinned .*not kept"):
        fetch_raw(src)
    dest = raw_dir(src) / "data/raw.bin"
    assert not dest.exists() and not dest.with_name("raw.bin.part").exists()


def test_cut_transfer_resumes_with_range(server):
    path = _serve(server)
    server.cut_once.add(path)
    fetch_raw(_source(hashlib.sha256(BODY).hexdigest()))
    assert (raw_dir(_source(None)) / "data/raw.bin").read_bytes() == BODY
    assert len(server.log) == 2 and server.log[0] == (path, None)
    assert server.log[1][1] == f"bytes={len(BODY) // 2}-"


def test_leftover_part_file_resumes_in_one_request(server):
    path = _serve(server)
    part = raw_dir(_source(None)) / "data/raw.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY[:1000])
    fetch_raw(_source(hashlib.sha256(BODY).hexdigest()))
    assert server.log == [(path, "bytes=1000-")]
    assert (raw_dir(_source(None)) / "data/raw.bin").read_bytes() == BODY


def test_unpinned_file_is_kept_with_a_warning_and_its_hash_recorded(server):
    _serve(server)
    with pytest.warns(UserWarning, match="no pinned sha256"):
        root = fetch_raw(_source(None))
    assert (root / "SHA256SUMS").read_text().split() == [hashlib.sha256(BODY).hexdigest(), "data/raw.bin"]


def test_offline_fails_at_once_naming_url_and_destination(server, monkeypatch):
    _serve(server)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _source(None)
    with pytest.raises(FetchError) as err:
        fetch_raw(src)
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and f"{server.url}/org/repo/{'0' * 40}/data/raw.bin" in msg
    assert str(raw_dir(src) / "data/raw.bin") in msg
    assert server.log == []


def test_unreachable_host_fails_at_once_naming_url_and_destination(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ROUTER_ML_FETCH_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ROUTER_ML_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(
        FetchError, match=r"cannot connect.*\n.*data/raw.bin\n    -> .*toy_source/data/raw.bin"
    ):
        fetch_raw(_source(None))


def test_cli_fetch_routerdc_from_a_mirror_then_adapter_reads_the_cache(
    server, shared_data, monkeypatch, capsys
):
    """End to end: `router-ml data fetch routerdc` from a local mirror of the upstream layout."""
    import json

    from router_ml.cli import main
    from router_ml.data.adapters import load_source

    src = get_source("routerdc")
    for raw, built in zip(src.raw, src.built, strict=True):
        server.files[f"/{src.repo}/{src.revision}/{raw.path}"] = (
            shared_data / src.folder / built.name
        ).read_bytes()
    with pytest.warns(UserWarning, match="6 raw file"):
        assert main(["data", "fetch", "routerdc"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["downloaded"] and all(out["identical_to_reference"].values())
    assert len(server.log) == len(src.raw)
    # the adapter fetches on a miss: here the build is already cached, so no request is made
    monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(Path(out["path"]).parent / "empty"))
    df = load_source("routerdc", costs=False)
    assert df["prompt_id"].str.startswith("routerdc_7models/").all() and len(df) > 90_000
    assert len(server.log) == len(src.raw)
    assert main(["data", "list"]) == 0
    assert "routerdc" in capsys.readouterr().out


def test_adapter_miss_offline_raises_file_not_found_with_where_to_get_it(monkeypatch, tmp_path):
    from router_ml.data.adapters import load_source

    monkeypatch.setenv("ROUTER_ML_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("ROUTER_ML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)zeroeval: cannot download 130 raw file\(s\).*raw.githubusercontent"
    ):
        load_source("zeroeval")


def test_cli_data_errors_name_the_problem(capsys):
    from router_ml.cli import main

    assert main(["data", "fetch", "nosuch"]) == 2
    assert "unknown data source 'nosuch'" in capsys.readouterr().err
    assert main(["data", "build"]) == 2
    assert "name a data set" in capsys.readouterr().err
