"""Fetch a data set's raw upstream files once, check them, and build it into the cache.

    router-ml data fetch llmrouter       # = fetch("llmrouter") -> $ROUTER_ML_CACHE_DIR/data/llmrouter_ulab

Raw files come from the upstream repository at the revision ``manifest.json`` pins:
``$ROUTER_ML_FETCH_BASE_URL/<repo>/<revision>/<path>`` (default ``https://raw.githubusercontent.com``),
into ``$ROUTER_ML_CACHE_DIR/data/raw/<folder>/<path>``. A download goes to ``<file>.part`` first,
resumes a cut transfer with an HTTP Range request, and is moved into place only once its sha256
matches the pinned one (a mismatch deletes it and raises :class:`ChecksumError`). Files whose
upstream hash is unknown (see the manifest's notes) are kept with a warning and their hash is
written to ``SHA256SUMS`` in the raw folder. A present file is never downloaded again.

Offline (``ROUTER_ML_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``), or when the host cannot be reached, a
fetch fails at once with :class:`FetchError`, naming each missing file, its URL and where to put it.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock
from tqdm.auto import tqdm

from router_ml.data.build import (
    RawFile,
    Source,
    build_source,
    get_source,
    matches_reference,
    sha256_file,
    sources,
)
from router_ml.paths import DATA_DIR_ENV, cache_dir, data_dir, source_dir

BASE_URL_ENV = "ROUTER_ML_FETCH_BASE_URL"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
OFFLINE_ENVS = ("ROUTER_ML_OFFLINE", "HF_HUB_OFFLINE")
RETRIES = 3  # resumed attempts after a transfer is cut


class FetchError(FileNotFoundError):
    """Data could not be fetched; the message says which file to get, from where, and where to put it."""


class ChecksumError(FetchError):
    """A downloaded file's sha256 differs from the pinned one; the file was not kept."""


class UnreachableError(FetchError):
    """The host could not be reached, or kept cutting the transfer."""


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENVS)


def base_url() -> str:
    return (os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def raw_url(src: Source, raw: RawFile) -> str:
    return f"{base_url()}/{src.repo}/{src.revision}/{raw.path}"


def raw_dir(src: Source) -> Path:
    return cache_dir() / "data" / "raw" / src.folder


def built_dir(src: Source) -> Path:
    return cache_dir() / "data" / src.folder


def is_built(folder: Path, src: Source) -> bool:
    return all((folder / f.name).is_file() for f in src.built)


def _where_else(src: Source) -> str:
    names = ", ".join(f.name for f in src.built)
    return f"or put the built files ({names}) in ${DATA_DIR_ENV}/{src.folder} (now {str(data_dir())!r})"


def _missing_message(src: Source, missing: list[RawFile], why: str) -> str:
    lines = [
        f"{src.name}: cannot download {len(missing)} raw file(s): {why}. Get each file and put it where shown:"
    ]
    shown = missing[:10]
    lines += [f"  {raw_url(src, r)}\n    -> {raw_dir(src) / r.path}" for r in shown]
    if len(missing) > len(shown):
        lines.append(f"  ... and {len(missing) - len(shown)} more under the same base URL and folder")
    lines.append(
        f"then run `router-ml data fetch {src.name}` again (it builds without downloading); {_where_else(src)}"
    )
    return "\n".join(lines)


def download(url: str, dest: Path, sha256: str | None, *, client: httpx.Client, desc: str = "") -> str:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed with Range); returns the sha256."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 416 and have:  # nothing left to send: the .part is whole
                    break
                if resp.status_code not in (200, 206):
                    raise FetchError(f"{url}: HTTP {resp.status_code}; expected the file for {dest}")
                resume = resp.status_code == 206 and resp.headers.get("content-range", "").startswith(
                    f"bytes {have}-"
                )
                start = have if resume else 0
                size = resp.headers.get("content-length")
                total = start + int(size) if size and size.isdigit() else None
                with (
                    part.open("ab" if resume else "wb") as fh,
                    tqdm(
                        total=total, initial=start, unit="B", unit_scale=True, desc=desc, disable=None
                    ) as bar,
                ):
                    for chunk in resp.iter_bytes(1 << 16):
                        fh.write(chunk)
                        bar.update(len(chunk))
            break
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout) as err:
            if attempt == RETRIES:
                raise UnreachableError(f"{url}: transfer cut {RETRIES + 1} times ({err})") from err
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise UnreachableError(f"{url}: cannot connect ({err})") from err
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumError(
            f"{url}: sha256 {digest} does not match the pinned {sha256}; the file was not kept"
        )
    os.replace(part, dest)
    return digest


def fetch_raw(src: Source, *, client: httpx.Client | None = None) -> Path:
    """Every raw file of ``src`` into its raw folder (present files are kept as they are)."""
    root = raw_dir(src)
    missing = [r for r in src.raw if not (root / r.path).is_file()]
    if not missing:
        return root
    if offline():
        flags = " or ".join(f"{v}=1" for v in OFFLINE_ENVS)
        raise FetchError(_missing_message(src, missing, f"downloads are off ({flags})"))
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)
    unverified = []
    try:
        for raw in missing:
            try:
                digest = download(
                    raw_url(src, raw), root / raw.path, raw.sha256, client=client, desc=raw.path
                )
            except UnreachableError as err:
                left = [r for r in missing if not (root / r.path).is_file()]
                raise FetchError(_missing_message(src, left, str(err))) from err
            if raw.sha256 is None:
                unverified.append(f"{digest}  {raw.path}")
    finally:
        if own:
            client.close()
    if unverified:
        with (root / "SHA256SUMS").open("a", encoding="utf-8") as fh:
            fh.write("\n".join(unverified) + "\n")
        warnings.warn(
            f"{src.name}: {len(unverified)} raw file(s) have no pinned sha256 (the exact upstream file was "
            f"not available when the manifest was made); kept unverified, hashes in {root / 'SHA256SUMS'}",
            stacklevel=2,
        )
    return root


@dataclass
class FetchResult:
    source: str
    path: Path
    downloaded: bool
    rows: dict[str, int]
    identical_to_reference: dict[str, bool]


def fetch(name: str, *, force: bool = False, client: httpx.Client | None = None) -> FetchResult:
    """Fetch source ``name``'s raw files and build it into ``$ROUTER_ML_CACHE_DIR/data/<folder>``."""
    src = get_source(name)
    out = built_dir(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{src.folder}.lock")):
        if is_built(out, src) and not force:
            return FetchResult(src.name, out, False, {}, {})
        if force:
            shutil.rmtree(raw_dir(src), ignore_errors=True)
        fetch_raw(src, client=client)
        report = build_source(src.name, raw_dir(src), out)
    return FetchResult(src.name, out, True, report.rows, matches_reference(src, out))


def locate(folder: str) -> Path:
    """The folder of a data set: in the data dir, else its build in the cache, fetched (and built)
    there on first use when a public source has that folder; FileNotFoundError otherwise."""
    if (data_dir() / folder).is_dir():
        return data_dir() / folder
    return ensure_source(folder) or source_dir(folder)


def ensure_source(folder: str) -> Path | None:
    """Fetch-on-miss for :func:`locate`: the cached build of ``folder``.

    None when no source has that folder; fetches (and builds) it when it is not cached yet.
    """
    src = next((s for s in sources().values() if s.folder == folder), None)
    if src is None:
        return None
    out = built_dir(src)
    if is_built(out, src):
        return out
    print(
        f"router-ml: {src.folder} is not in {str(data_dir())!r}; fetching it into {str(out)!r}",
        file=sys.stderr,
    )
    return fetch(src.name).path


def where_present(src: Source) -> str:
    """'data dir', 'cache' or 'no'."""
    if is_built(data_dir() / src.folder, src):
        return "data dir"
    return "cache" if is_built(built_dir(src), src) else "no"


__all__ = [
    "BASE_URL_ENV",
    "ChecksumError",
    "FetchError",
    "FetchResult",
    "UnreachableError",
    "base_url",
    "built_dir",
    "download",
    "ensure_source",
    "fetch",
    "fetch_raw",
    "locate",
    "offline",
    "raw_dir",
    "raw_url",
    "where_present",
]
