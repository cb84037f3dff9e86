"""The backend catalog: where each model is served, how to reach it and what it costs.

One YAML file (or a directory of them, ``conf/backends/``) lists backends::

    backends:
      - name: smollm2-vllm            # the name routers and clients use
        kind: vllm                    # vllm: a local OpenAI-compatible server we run | api
        base_url: http://127.0.0.1:8101/v1
        served_model_id: smollm2-135m # the "model" sent upstream (default: name)
        api_key_env: null             # the NAME of the env var with the key, never the key
        first_token_timeout_s: 5      # also connect_timeout_s, timeout_s, max_retries
        prefill_tokens_per_s: 400     # optional: a resumed stream's deadline grows by its prefill
        prices: {gpu_hour_usd: 0.5, decode_tokens_per_s: 60}   # ModelSpec price fields
        latency: {ttft_s: 0.05, tokens_per_s: 65}              # ModelSpec latency priors
        context_window: 2048          # also max_tokens, tokenizer, params_b
        capabilities: {tools: false, vision: false, json_mode: true}   # default: none
        launch: {engine: vllm, model: models/smollm2-135m, port: 8101}   # kind vllm only
        api: openai                   # the wire format: openai (default) | anthropic | azure
        headers: {OpenAI-Organization: org-x, X-Gateway-Token: {env: GATEWAY_TOKEN}}   # extra headers

``api`` selects how a request reaches the backend: ``openai`` (Chat Completions,
``{base_url}/chat/completions``, ``Authorization: Bearer``), ``anthropic`` (the native Messages API,
``{base_url}/v1/messages`` with ``base_url`` the server root such as ``https://api.anthropic.com``,
``x-api-key`` and ``anthropic-version: {api_version}`` (default ``2023-06-01``); ``max_tokens`` is
required, as the Messages API needs one for requests that name none; translated by
:mod:`~router_ml.backends.anthropic`) or ``azure`` (Azure OpenAI:
``{base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}``, the
``api-key`` header; ``deployment`` defaults to ``served_model_id``, ``api_version`` is required).
``kind`` is ``api`` for both. ``headers`` adds headers to every request to the backend: a value is
a literal string, or ``{env: NAME}`` for a secret read from the environment at call time (the
same rule as ``api_key_env``: a value shaped like a key is refused).
``prices.cached_input_per_mtok`` prices the prompt tokens a provider served from its prompt cache
(``prompt_tokens_details.cached_tokens``; Anthropic's ``cache_read_input_tokens``) and
``prices.cache_write_per_mtok`` the ones it wrote to it (Anthropic's ``cache_creation_input_tokens``);
unset, they cost ``input_per_mtok``: a discount is the operator's to state, never guessed.

``capabilities`` says what the model accepts beyond plain chat: ``tools`` (function calling:
``tools`` / ``tool_choice`` / ``functions``), ``vision`` (``image_url`` content parts), ``json_mode``
(``response_format`` ``json_object`` / ``json_schema``). Each is off unless set: a model is trusted
with a request kind only where the operator says so (a model without tool support ignores ``tools``
and answers in prose, which the client cannot tell from a real answer).
:mod:`~router_ml.backends.capabilities` matches them, and ``context_window``, against a request.

Values may use OmegaConf interpolation (``${oc.env:ROUTER_ML_MODELS_DIR,models}``), resolved at load.
Each entry is validated by the pydantic model :class:`BackendEntry` (its ``launch`` by
:class:`~router_ml.backends.local.launch_spec.Launch`); every error is a :class:`CatalogError`
naming the file, the backend and the field, e.g.
``conf/backends/x.yaml: backend 'gpt-4o': field 'prices.input_per_mtok' = -1.0: Input should be
greater than or equal to 0``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from router_ml.backends.config_errors import Hidden, field_problem
from router_ml.backends.local.launch_spec import LAUNCH_KEYS, Launch
from router_ml.decision.spec import ModelPool, ModelSpec, PoolConfigError, UnknownModelError

KINDS = ("vllm", "api")
APIS = ("openai", "anthropic", "azure")  # wire formats
ANTHROPIC_VERSION = "2023-06-01"  # the anthropic-version header unless api_version says otherwise
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
# headers the transport or the api sets: a catalog cannot override them
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "authorization",
     "api-key", "x-api-key", "anthropic-version"}
)  # fmt: skip
SPEC_KIND = {"vllm": "local", "api": "api"}  # catalog kind -> ModelSpec kind
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
Seconds = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prices(_Strict):
    """``ModelSpec`` price fields: per 1M tokens (API), or by the machine hour (local)."""

    input_per_mtok: NonNegative | None = None
    output_per_mtok: NonNegative | None = None
    gpu_hour_usd: NonNegative | None = None
    decode_tokens_per_s: Positive | None = None
    prefill_cost_ratio: NonNegative | None = None
    cached_input_per_mtok: NonNegative | None = None  # prompt tokens read from a provider's cache
    cache_write_per_mtok: NonNegative | None = None  # prompt tokens written to it (Anthropic)


class Latency(_Strict):
    """``ModelSpec`` latency priors (else the llmperf priors by model size)."""

    ttft_s: Positive | None = None
    tokens_per_s: Positive | None = None


class Capabilities(_Strict):
    """What a model accepts beyond plain chat; each off unless the catalog says so."""

    tools: StrictBool = False
    vision: StrictBool = False
    json_mode: StrictBool = False

    def names(self) -> frozenset[str]:
        """The capabilities switched on, by name."""
        return frozenset(k for k, v in self.model_dump().items() if v)


@dataclass(frozen=True)
class EnvRef:
    """A header value read from the environment at call time: ``{env: NAME}`` in the catalog."""

    env: str


class BackendEntry(_Strict):
    """One ``backends:`` entry of a catalog file, as written (see the module docstring)."""

    name: Annotated[StrictStr, Field(pattern=r"\S")]
    kind: Literal["vllm", "api"]
    base_url: StrictStr
    served_model_id: StrictStr | None = None
    api_key_env: StrictStr | None = None
    connect_timeout_s: Seconds = 2.0
    first_token_timeout_s: Seconds = 10.0
    timeout_s: Seconds = 120.0
    max_retries: Annotated[StrictInt, Field(ge=0)] = 2
    prefill_tokens_per_s: Positive | None = None
    prices: Prices = Prices()
    latency: Latency = Latency()
    context_window: Annotated[StrictInt, Field(gt=0)] | None = None
    max_tokens: Annotated[StrictInt, Field(gt=0)] | None = None
    tokenizer: StrictStr | None = None
    params_b: Positive | None = None
    capabilities: Capabilities = Capabilities()
    launch: Launch | None = None  # kind vllm only
    api: Literal["openai", "anthropic", "azure"] = "openai"
    headers: dict[StrictStr, Any] = Field(default_factory=dict)  # value: str | {env: NAME}
    deployment: StrictStr | None = None  # api azure only
    api_version: StrictStr | None = None  # api azure (required) and anthropic

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, Any]) -> dict[str, str | EnvRef]:
        out: dict[str, str | EnvRef] = {}
        for name, value in v.items():
            if not _HEADER_NAME.match(name):
                raise Hidden(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise Hidden(
                    f"{name!r} is set by router-ml (the api's own auth and framing headers); "
                    "give the key with api_key_env"
                )
            if isinstance(value, Mapping) and set(value) == {"env"} and isinstance(value["env"], str):
                if not _ENV_NAME.match(value["env"]):
                    raise Hidden(
                        f"header {name!r}: env {value['env']!r} must be an environment variable name "
                        "like GATEWAY_TOKEN"
                    )
                out[name] = EnvRef(env=value["env"])
            elif not isinstance(value, str):
                raise Hidden(f"header {name!r}: the value must be a string or {{env: NAME}}")
            elif _secret_in_header(value) or "\r" in value or "\n" in value:
                raise Hidden(
                    f"header {name!r} looks like a literal secret or holds a line break (value not "
                    "shown): give {env: NAME}, the environment variable that holds it"
                )
            else:
                out[name] = value
        return out

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. 'http://127.0.0.1:8101/v1'")
        try:
            url.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and looks_like_secret(v):
            raise Hidden(
                "looks like a literal API key (value not shown): give the NAME of the environment "
                "variable that holds the key, e.g. OPENAI_API_KEY"
            )
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be an environment variable name like OPENAI_API_KEY")
        return v

    @field_validator("launch", mode="before")
    @classmethod
    def _launch_is_local(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("kind", "vllm") != "vllm":
            raise Hidden("is only allowed for kind 'vllm' (a server router-ml starts)")
        return v

    @model_validator(mode="after")
    def _across_fields(self) -> BackendEntry:
        if self.first_token_timeout_s > self.timeout_s:
            raise ValueError(
                f"field 'first_token_timeout_s' = {self.first_token_timeout_s!r} must not exceed "
                f"timeout_s ({self.timeout_s})"
            )
        port = urlsplit(self.base_url).port
        if self.launch is not None and port is not None and self.launch.port != port:
            raise ValueError(
                f"field 'launch.port' = {self.launch.port}: differs from the base_url port {port}"
            )
        if self.api != "openai" and self.kind != "api":
            raise ValueError(f"field 'api' = {self.api!r} needs kind 'api' (a provider's endpoint)")
        if self.deployment is not None and self.api != "azure":
            raise ValueError("field 'deployment' is only for api 'azure'")
        if self.api_version is not None and self.api == "openai":
            raise ValueError("field 'api_version' is only for api 'azure' or 'anthropic'")
        if self.api == "azure" and not self.api_version:
            raise ValueError("field 'api_version' is missing: api 'azure' needs one, e.g. '2024-10-21'")
        if self.api == "anthropic" and self.capabilities.json_mode:
            raise ValueError(
                "field 'capabilities.json_mode': api 'anthropic' has no response_format (the Messages "
                "API would answer in prose), so JSON-mode requests must not be routed there"
            )
        if self.api == "anthropic" and self.max_tokens is None:
            raise ValueError(
                "field 'max_tokens' is missing: api 'anthropic' needs it (the Messages API requires "
                "max_tokens; it is sent when a request names none)"
            )
        return self


FIELDS = tuple(BackendEntry.model_fields)


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
    prefill_tokens_per_s: float | None = None  # extends a resumed stream's first-token deadline
    capabilities: frozenset[str] = frozenset()  # of "tools", "vision", "json_mode"
    launch: Mapping[str, Any] | None = field(default=None, compare=False)
    api: str = "openai"  # one of APIS
    headers: Mapping[str, str | EnvRef] = field(default_factory=dict, compare=False)
    deployment: str | None = None  # azure: the deployment name (default: served_model_id)
    api_version: str | None = None  # azure: api-version; anthropic: anthropic-version
    cached_input_per_mtok: float | None = None  # None: cached prompt tokens cost the input price
    cache_write_per_mtok: float | None = None

    def api_key(self) -> str | None:
        """The key from ``os.environ[api_key_env]``, read at call time; ``None`` if unset or empty."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def extra_headers(self) -> dict[str, str]:
        """The catalog's ``headers``, ``{env: NAME}`` values read now; :class:`MissingSecret` names
        a variable that is unset or empty."""
        out = {}
        for name, value in self.headers.items():
            if isinstance(value, EnvRef):
                got = os.environ.get(value.env)
                if not got:
                    raise MissingSecret(
                        f"header {name!r} reads the environment variable {value.env}, which is unset or empty"
                    )
                value = got
            out[name] = value
        return out

    def secrets(self) -> list[str]:
        """The secret values sent to the backend now (the key, ``{env: ...}`` headers): what must
        never be echoed into errors or logs."""
        found = [
            self.api_key(),
            *(os.environ.get(v.env) for v in self.headers.values() if isinstance(v, EnvRef)),
        ]
        return [s for s in found if s]

    @property
    def chat_url(self) -> str:
        """Where a chat request goes, by ``api``."""
        if self.api == "anthropic":
            return f"{self.base_url}/v1/messages"
        if self.api == "azure":
            deployment = quote(self.deployment or self.served_model_id, safe="")
            version = quote(self.api_version or "", safe="")
            return f"{self.base_url}/openai/deployments/{deployment}/chat/completions?api-version={version}"
        return f"{self.base_url}/chat/completions"

    @property
    def root_url(self) -> str:
        """The server root (``base_url`` without a trailing ``/v1``), where vLLM serves ``/metrics``."""
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def __repr__(self) -> str:  # no spec dump, never a key
        api = "" if self.api == "openai" else f", api={self.api!r}"
        return f"Backend({self.name!r}, kind={self.kind!r}{api}, base_url={self.base_url!r})"


class MissingSecret(RuntimeError):
    """A secret the catalog names (by its environment variable) is not set at call time."""


def looks_like_secret(value: str) -> bool:
    """True for strings shaped like an API key rather than an environment variable name."""
    if value.startswith(_SECRET_PREFIXES):
        return True
    # long mixed-case alphanumeric runs are keys; env var names are conventionally UPPER_SNAKE
    return len(value) >= 24 and bool(re.search(r"[a-z]", value)) and bool(re.search(r"\d", value))


def _secret_in_header(value: str) -> bool:
    """A header value shaped like a key: a key's prefix, or a run of 24+ letters and digits mixed
    (a token), unlike the hyphenated words of ``anthropic-beta: prompt-caching-2024-07-31``."""
    if value.startswith(_SECRET_PREFIXES):
        return True
    runs = re.findall(r"[A-Za-z0-9_+/=]{24,}", value)
    return any(re.search(r"[A-Za-z]", r) and re.search(r"\d", r) for r in runs)


def _backend_from_mapping(raw: Any, source: str, index: int) -> Backend:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    where = (
        f"{source}: backend {name!r}"
        if isinstance(name, str) and name.strip()
        else f"{source}: backend #{index}"
    )
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{where}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        entry = BackendEntry.model_validate(raw)
    except ValidationError as err:
        allowed = {(): list(FIELDS), ("prices",): list(Prices.model_fields),
                   ("latency",): list(Latency.model_fields), ("launch",): list(LAUNCH_KEYS),
                   ("capabilities",): list(Capabilities.model_fields)}  # fmt: skip
        raise CatalogError(f"{where}: {field_problem(err, allowed)}") from None
    prices = entry.prices.model_dump(exclude_none=True)
    cached_in, cache_write = (
        prices.pop("cached_input_per_mtok", None),
        prices.pop("cache_write_per_mtok", None),
    )
    latency = entry.latency.model_dump(exclude_none=True)
    limits = {f: getattr(entry, f) for f in ("context_window", "max_tokens", "tokenizer", "params_b")}
    try:
        spec = ModelSpec(name=entry.name, kind=SPEC_KIND[entry.kind], **prices, **latency,
                         **{k: v for k, v in limits.items() if v is not None})  # fmt: skip
        ModelPool([spec])  # that a price can be determined (local: by the machine hour)
    except PoolConfigError as err:
        raise CatalogError(f"{where}: {err}") from None
    return Backend(
        name=entry.name,
        kind=entry.kind,
        base_url=entry.base_url,
        served_model_id=entry.served_model_id or entry.name,
        api_key_env=entry.api_key_env,
        spec=spec,
        connect_timeout_s=entry.connect_timeout_s,
        first_token_timeout_s=entry.first_token_timeout_s,
        timeout_s=entry.timeout_s,
        max_retries=entry.max_retries,
        prefill_tokens_per_s=entry.prefill_tokens_per_s,
        capabilities=entry.capabilities.names(),
        launch=dict(raw["launch"]) if entry.launch is not None else None,
        api=entry.api,
        headers=dict(entry.headers),
        deployment=entry.deployment,
        api_version=entry.api_version or (ANTHROPIC_VERSION if entry.api == "anthropic" else None),
        cached_input_per_mtok=cached_in,
        cache_write_per_mtok=cache_write,
    )


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
