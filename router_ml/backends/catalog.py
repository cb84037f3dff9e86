"""The backend catalog: where each model is served, how to reach it and what it costs.

One YAML file (or a directory of them, ``conf/backends/``) lists backends::

    backends:
      - name: smollm2-vllm            # the name routers and clients use
        kind: vllm                    # vllm: a local OpenAI-compatible server we run | api
        base_url: http://127.0.0.1:8101/v1
        served_model_id: smollm2-135m # the "model" sent upstream (default: name)
        api_key_env: null             # the NAME of the env var with the key, never the key
        first_token_timeout_s: 5      # also connect_timeout_s, timeout_s, max_retries
        prices: {gpu_hour_usd: 0.5, decode_tokens_per_s: 60}   # ModelSpec price fields
        latency: {ttft_s: 0.05, tokens_per_s: 65}              # ModelSpec latency priors
        context_window: 2048          # also max_tokens, tokenizer, params_b
        launch: {engine: vllm, model: models/smollm2-135m, port: 8101}   # kind vllm only

Values may use OmegaConf interpolation (``${oc.env:ROUTER_ML_MODELS_DIR,models}``), resolved at load.
Every validation error is a :class:`CatalogError` naming the file, the backend and the field.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router_ml.decision.spec import ModelPool, ModelSpec, PoolConfigError, UnknownModelError

KINDS = ("vllm", "api")
SPEC_KIND = {"vllm": "local", "api": "api"}  # catalog kind -> ModelSpec kind
PRICE_FIELDS = (
    "input_per_mtok",
    "output_per_mtok",
    "gpu_hour_usd",
    "decode_tokens_per_s",
    "prefill_cost_ratio",
)
LATENCY_FIELDS = ("ttft_s", "tokens_per_s")
SPEC_FIELDS = ("context_window", "max_tokens", "tokenizer", "params_b")
TIMEOUT_FIELDS = ("connect_timeout_s", "first_token_timeout_s", "timeout_s")
FIELDS = (
    "name",
    "kind",
    "base_url",
    "served_model_id",
    "api_key_env",
    *TIMEOUT_FIELDS,
    "max_retries",
    "prices",
    "latency",
    *SPEC_FIELDS,
    "launch",
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# prefixes of real API keys (OpenAI, Anthropic, Groq, Hugging Face, GitHub, Google, xAI, Stripe-style)
_SECRET_PREFIXES = (
    "sk-",
    "sk_",
    "sk-ant-",
    "gsk_",
    "hf_",
    "ghp_",
    "github_pat_",
    "AIza",
    "xai-",
    "pk-",
    "Bearer ",
)


class CatalogError(ValueError):
    """An invalid catalog entry; the message names the file, the backend and the field."""


@dataclass(frozen=True)
class Backend:
    """One model endpoint. ``spec`` carries prices, latency priors, tokenizer and limits."""

    name: str
    kind: str
    base_url: str
    served_model_id: str
    api_key_env: str | None
    spec: ModelSpec
    connect_timeout_s: float = 2.0
    first_token_timeout_s: float = 10.0
    timeout_s: float = 120.0
    max_retries: int = 2
    launch: Mapping[str, Any] | None = field(default=None, compare=False)

    def api_key(self) -> str | None:
        """The key from ``os.environ[api_key_env]``, read at call time; ``None`` if unset or empty."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def root_url(self) -> str:
        """The server root (``base_url`` without a trailing ``/v1``), where vLLM serves ``/metrics``."""
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def __repr__(self) -> str:  # no spec dump, never a key
        return f"Backend({self.name!r}, kind={self.kind!r}, base_url={self.base_url!r})"


def looks_like_secret(value: str) -> bool:
    """True for strings shaped like an API key rather than an environment variable name."""
    if value.startswith(_SECRET_PREFIXES):
        return True
    # long mixed-case alphanumeric runs are keys; env var names are conventionally UPPER_SNAKE
    return len(value) >= 24 and bool(re.search(r"[a-z]", value)) and bool(re.search(r"\d", value))


def _backend_from_mapping(raw: Any, source: str, index: int) -> Backend:
    where = f"{source}: backend #{index}"
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{where}: expected a mapping of fields, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(f"{where}: field 'name' = {name!r} must be a non-empty string")
    where = f"{source}: backend {name!r}"

    def bad(fld: str, rule: str, show: bool = True) -> CatalogError:
        shown = f" = {raw.get(fld)!r}" if show else ""
        return CatalogError(f"{where}: field {fld!r}{shown} {rule}")

    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {unknown}; allowed fields: {list(FIELDS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise bad("kind", f"must be one of {list(KINDS)}")
    base_url = raw.get("base_url")
    url = urlsplit(base_url) if isinstance(base_url, str) else None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise bad("base_url", "must be an http(s) URL with a host, e.g. 'http://127.0.0.1:8101/v1'")
    try:
        port = url.port
    except ValueError:
        raise bad("base_url", "has an invalid port") from None
    served = raw.get("served_model_id") or name
    if not isinstance(served, str):
        raise bad("served_model_id", "must be a string")
    key_env = raw.get("api_key_env")
    if key_env is not None:
        if not isinstance(key_env, str) or looks_like_secret(key_env):
            raise bad(
                "api_key_env",
                "looks like a literal API key (value not shown): give the NAME of the environment "
                "variable that holds the key, e.g. OPENAI_API_KEY",
                show=False,
            )
        if not _ENV_NAME.match(key_env):
            raise bad("api_key_env", "must be an environment variable name like OPENAI_API_KEY")
    timing: dict[str, Any] = {}
    for fld in TIMEOUT_FIELDS:
        if fld in raw:
            v = raw[fld]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise bad(fld, "must be a finite number of seconds > 0")
            timing[fld] = float(v)
    if "max_retries" in raw:
        v = raw["max_retries"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad("max_retries", "must be an integer >= 0")
        timing["max_retries"] = v
    spec_fields: dict[str, Any] = {"name": name, "kind": SPEC_KIND[kind]}
    for group, allowed in (("prices", PRICE_FIELDS), ("latency", LATENCY_FIELDS)):
        sub = raw.get(group) or {}
        if not isinstance(sub, Mapping):
            raise bad(group, f"must be a mapping with keys from {list(allowed)}")
        extra = sorted(set(sub) - set(allowed))
        if extra:
            raise CatalogError(f"{where}: field {group!r}: unknown key(s) {extra}; allowed: {list(allowed)}")
        spec_fields.update(sub)
    spec_fields.update({f: raw[f] for f in SPEC_FIELDS if raw.get(f) is not None})
    try:
        spec = ModelSpec(**spec_fields)
        ModelPool([spec])  # validates every spec field and that a price can be determined
    except (PoolConfigError, TypeError) as err:
        raise CatalogError(f"{where}: {err}") from None
    launch = raw.get("launch")
    if launch is not None:
        if kind != "vllm":
            raise bad("launch", "is only allowed for kind 'vllm' (a server router-ml starts)", show=False)
        if not isinstance(launch, Mapping):
            raise bad("launch", "must be a mapping (engine, model, port, args, ...)")
        lport = launch.get("port")
        if lport is not None and port is not None and lport != port:
            raise bad("launch", f"port {lport!r} differs from the base_url port {port}", show=False)
        launch = dict(launch)
    backend = Backend(
        name=name,
        kind=kind,
        base_url=base_url.rstrip("/"),
        served_model_id=served,
        api_key_env=key_env,
        spec=spec,
        launch=launch,
        **timing,
    )
    if backend.first_token_timeout_s > backend.timeout_s:
        raise bad("first_token_timeout_s", f"must not exceed timeout_s ({backend.timeout_s})")
    return backend


def _read_yaml(path: Path) -> Any:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException, OSError, ValueError) as err:  # syntax, interpolation, I/O
        raise CatalogError(f"{path}: cannot read the catalog: {err}") from None


class Catalog:
    """An ordered set of uniquely named :class:`Backend` entries."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends: list[Backend] = list(backends)
        self._by_name: dict[str, Backend] = {}
        for b in self.backends:
            if b.name in self._by_name:
                raise CatalogError(f"backend {b.name!r}: duplicate name in the catalog")
            self._by_name[b.name] = b

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def get(self, name: str) -> Backend:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownModelError(f"backend {name!r} is not in the catalog {self.names}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    def __repr__(self) -> str:
        return f"Catalog({self.names})"

    def pool(self) -> ModelPool:
        """The decision layer's pool: one ModelSpec per backend (kind vllm -> "local")."""
        return ModelPool([b.spec for b in self.backends])

    @classmethod
    def from_entries(cls, entries: Any, source: str = "<config>") -> Catalog:
        """From a list of backend mappings (or ``{"backends": [...]}``, OmegaConf containers too, e.g.
        a composed Hydra group); ``source`` labels errors."""
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(entries, (DictConfig, ListConfig)):
            entries = OmegaConf.to_container(entries, resolve=True)
        if isinstance(entries, Mapping):
            extra = sorted(set(entries) - {"backends"})
            if extra:
                raise CatalogError(f"{source}: unknown top-level key(s) {extra}; expected only 'backends'")
            entries = entries.get("backends")
        if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
            raise CatalogError(f"{source}: 'backends' must be a non-empty list of backend mappings")
        backends = [_backend_from_mapping(raw, source, i) for i, raw in enumerate(entries)]
        seen: set[str] = set()
        for b in backends:
            if b.name in seen:
                raise CatalogError(f"{source}: backend {b.name!r}: field 'name' is a duplicate")
            seen.add(b.name)
        return cls(backends)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalog:
        """A YAML file, or every ``*.yaml`` / ``*.yml`` file of a directory (sorted by name)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not files:
                raise CatalogError(f"{path}: no *.yaml catalog files in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise CatalogError(f"{path}: catalog file or directory not found")
        backends: list[Backend] = []
        origin: dict[str, Path] = {}
        for f in files:
            for b in cls.from_entries(_read_yaml(f), source=str(f)):
                if b.name in origin:
                    raise CatalogError(
                        f"{f}: backend {b.name!r}: field 'name' duplicates the backend of {origin[b.name]}"
                    )
                origin[b.name] = f
                backends.append(b)
        return cls(backends)
