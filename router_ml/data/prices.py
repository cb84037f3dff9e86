"""Prices per 1M tokens for every model in the routing data, token estimates and per-row costs.

Price keys (values of :data:`MODEL_PRICE_KEYS`) name a table and an entry in it:

- ``litellm:<key>``      LiteLLM's price map v1.110.2, falling back to v1.55.10 (2024 models it dropped)
- ``litellm-2024:<key>`` v1.55.10 only (where the current entry was re-priced for a newer model version)
- ``routerarena:<key>``  RouterArena's ``cost.json``
- ``llmrouter:<key>``    ``llmrouter_ulab/llm_candidates.json`` (NVIDIA-hosted list prices)

Open models without a list price of their own are priced at Together AI's size tier in LiteLLM
(``together-ai-<lo>b-<hi>b``) by their nominal parameter count. Models with no defensible price
(retired closed APIs that LiteLLM never listed) are left out: they get NaN cost and a warning.
The mapping and its rules are documented in ``router_ml/data/README.md``.

Without the price tables (no ``llm_prices`` under ``$ROUTER_ML_DATA_DIR``), :func:`model_prices`
still prices the llmrouter_ulab pool from the prices shipped in
:mod:`router_ml.data.default`, logs a warning once, and leaves every other model unpriced (NaN).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from router_ml import paths
from router_ml.paths import DATA_DIR_ENV, source_dir

log = logging.getLogger(__name__)
PRICES_FOLDER = "llm_prices"
LITELLM_FILES: tuple[str, ...] = ("litellm_model_prices_v1.110.2.json", "litellm_model_prices_v1.55.10.json")
CHARS_PER_TOKEN = 4

# Expected output tokens per task when no output was observed: rounded medians of the measured
# output lengths (chars / 4) in the data sets - reason: GSM8K 79-125, MMLU-Pro STEM CoT 85-136,
# MATH-L5 262; code: CRUXEval 144, MBPP 205; creative: AlpacaEval 124-302, MT-Bench writing and
# roleplay ~300; qa: MMLU-Pro CoT 51-96; summarize: MT-Bench extraction 42 (mean 100); classify:
# no data, a label plus a few words. See README "Output-token prior".
OUTPUT_TOKEN_PRIOR: dict[str, int] = {
    "classify": 10,
    "summarize": 100,
    "code": 200,
    "reason": 150,
    "creative": 250,
    "qa": 80,
}

_TIER = "litellm:together-ai-{}"


def _names(text: str) -> list[str]:
    """Whitespace-separated model names (keeps the long lists below compact)."""
    return text.split()


_MIXTRAL = "litellm:together_ai/mistralai/Mixtral-8x7B-Instruct-v0.1"
_LLAMA31_8B = "litellm:together_ai/meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
_LLAMA31_70B = "litellm:together_ai/meta-llama/Meta-Llama-3.1-70B-Instruct-Turbo"
_LLAMA31_405B = "litellm:together_ai/meta-llama/Llama-3.1-405B-Instruct"
_DEEPSEEK_V2_CHAT = "litellm-2024:deepseek-chat"  # 2024 V2 endpoints; the current entries are V3 prices
_DEEPSEEK_V2_CODER = "litellm-2024:deepseek-coder"

LLMROUTER_POOL: tuple[str, ...] = tuple(
    _names(
        """qwen2.5-7b-instruct codegemma-7b gemma-2-9b-it llama-3.1-8b-instruct llama3-chatqa-1.5-8b
    mistral-7b-instruct-v0.3 llama-3.3-nemotron-super-49b-v1 llama-3.1-nemotron-51b-instruct
    llama3-chatqa-1.5-70b llama3-70b-instruct mixtral-8x7b-instruct-v0.1 mixtral-8x22b-instruct-v0.1
    palmyra-creative-122b mistral-nemo-12b-instruct"""
    )
)

# Open models with no list price of their own -> Together AI's size tier (nominal parameter count).
SIZE_TIER_MODELS: dict[str, str] = {
    "up-to-4b": """Phi-3-mini-4k-instruct Phi-3.5-mini-instruct Qwen2.5-3B-Instruct gemma-2-2b-it
        FuseChat-Llama-3.2-1B-Instruct FuseChat-Llama-3.2-3B-Instruct gemma-2b-it minichat-3b phi-2
        phi-2-sft""",
    "4.1b-8b": """mistralai/Mistral-7B-v0.1 meta-math/MetaMath-Mistral-7B itpossible/Chinese-Mistral-7B-v0.1
        HuggingFaceH4/zephyr-7b-beta cognitivecomputations/dolphin-2.6-mistral-7b meta-llama/Meta-Llama-3-8B
        cognitivecomputations/dolphin-2.9-llama3-8b Llama-2-7b-hf Meta-Llama-3-8B Mistral-7B-v0.1
        Mistral-7B-v0.2-hf Mistral-7B-Instruct-v0.1 Mistral-7B-Instruct-v0.2 mathstral-7B Qwen1.5-7B-Chat
        Yi-6B Yi-6b-Chat gemma-7b Qwen2-7B-Instruct FuseChat-Llama-3.1-8B-Instruct
        FuseChat-Qwen-2.5-7B-Instruct OpenHermes-2.5-Mistral-7B alpaca-7b alpaca-7b_concise
        alpaca-7b_verbose alpaca-farm-ppo-human alpaca-farm-ppo-sim-gpt4-20k chatglm2-6b falcon-7b-instruct
        gemma-7b-it vicuna-7b vicuna-7b-v1.3 vicuna-7b-v1.5""",
    "8.1b-21b": """WizardLM/WizardLM-13B-V1.2 Llama-2-13b-hf Yi-1.5-9B-Chat FuseChat-Gemma-2-9B-Instruct
        Qwen-14B-Chat baize-v2-13b minotaur-13b nous-hermes-13b oasst-sft-pythia-12b
        openbuddy-llama2-13b-v11.1 pythia-12b-mix-sft ultralm-13b vicuna-13b vicuna-13b-v1.5
        vicuna-13b-v1.5-togetherai wizardlm-13b""",
    # code-llama-34b: RouterBench's measured cost implies $0.78/1M (RouterArena lists 3.2)
    "21.1b-41b": """zero-one-ai/Yi-34B-Chat meta/code-llama-instruct-34b-chat Yi-34B Qwen2.5-32B-Instruct
        Yi-1.5-34B-Chat gemma-2-27b-it gemma-2-27b-it@together falcon-40b-instruct oasst-rlhf-llama-33b
        oasst-sft-llama-33b openbuddy-falcon-40b-v9 openbuddy-llama-30b-v7.1""",
    "41.1b-80b": """meta/llama-2-70b-chat Llama-2-70b-hf Meta-Llama-3-70B Meta-Llama-3_1-70B Qwen1.5-72B-Chat
        Athene-70B Qwen2-72B-Instruct humpback-llama2-70b openbuddy-llama2-70b-v10.1""",
    "81.1b-110b": "Qwen1.5-110B",
}

_LISTED = """gpt-3.5-turbo-1106 gpt-4-1106-preview gpt-3.5-turbo-0125 gpt-3.5-turbo-0301 gpt-4-0314
    gpt-4-turbo-2024-04-09 gpt-4o-2024-05-13 gpt-4o-2024-08-06 gpt-4o-mini-2024-07-18 o1-mini-2024-09-12
    o1-preview-2024-09-12 claude-3-5-sonnet-20240620 claude-3-haiku-20240307 claude-3-opus-20240229
    claude-3-sonnet-20240229 command-r command-r-plus jamba-1.5-large gemini-1.5-flash gemini-1.5-pro
    gemini-1.5-flash-002 gemini-1.5-pro-002"""

# our model name (as the adapters emit it) -> price key; reviewed by hand.
MODEL_PRICE_KEYS: dict[str, str] = {
    # llmrouter_ulab: the pool's own NVIDIA-hosted prices
    **{m: f"llmrouter:{m}" for m in LLMROUTER_POOL},
    **{m: _TIER.format(tier) for tier, names in SIZE_TIER_MODELS.items() for m in _names(names)},
    # closed APIs whose LiteLLM key is the model name itself
    **{m: f"litellm:{m}" for m in _names(_LISTED)},
    # exact Together AI entries (also for the same weights: base Mixtral, the *_concise prompt variant)
    **dict.fromkeys(
        _names(
            "mistralai/mixtral-8x7b-chat mistralai/Mixtral-8x7B-Instruct-v0.1 Mixtral-8x7B-v0.1 "
            "Mixtral-8x7B-Instruct-v0.1 Mixtral-8x7B-Instruct-v0.1_concise"
        ),
        _MIXTRAL,
    ),
    **dict.fromkeys(["Meta-Llama-3_1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct"], _LLAMA31_8B),
    **dict.fromkeys(
        _names(
            "Meta-Llama-3_1-70B-Instruct Meta-Llama-3.1-70B-Instruct Meta-Llama-3.1-70B-Instruct@hyperbolic"
        ),
        _LLAMA31_70B,
    ),
    **dict.fromkeys(
        _names(
            "Llama-3.1-405B-Inst-fp8 Llama-3.1-405B-Inst@sambanova Llama-3.1-405B-Instruct-Turbo "
            "Meta-Llama-3.1-405B-Instruct@hyperbolic"
        ),
        _LLAMA31_405B,
    ),
    "Meta-Llama-3_1-8B": "litellm:together_ai/meta-llama/Meta-Llama-3.1-8B",
    "Qwen2.5-72B-Instruct": "litellm:together_ai/Qwen/Qwen2.5-72B-Instruct-Turbo",
    "Qwen2.5-7B-Instruct": "litellm:together_ai/Qwen/Qwen2.5-7B-Instruct-Turbo",
    # RouterArena's Together-hosted prices
    "Meta-Llama-3-70B-Instruct": "routerarena:meta-llama/Meta-Llama-3-70B-Instruct-Turbo",
    "Meta-Llama-3-8B-Instruct": "routerarena:meta-llama/llama-3-8b-instruct",
    "mistralai/mistral-7b-chat": "routerarena:mistralai/mistral-7b-instruct",
    # the maker's own API for open-weight models it serves
    **dict.fromkeys(
        _names("DeepSeek-Coder-V2 DeepSeek-Coder-V2-0724 deepseek-coder deepseek-v2-coder-0724"),
        _DEEPSEEK_V2_CODER,
    ),
    **dict.fromkeys(["deepseek-chat", "deepseek-v2-chat-0628", "deepseek-v2.5-0908"], _DEEPSEEK_V2_CHAT),
    "c4ai-command-r-v01": "litellm:command-r",
    "Mistral-Large-2": "litellm:mistral/mistral-large-2407",
    "Mistral-Nemo-Instruct-2407": "litellm:mistral/open-mistral-nemo-2407",
    # closed APIs under another key
    # LiteLLM's "claude-instant-1.2" entry is 10x below Anthropic's $0.80/$2.40; Bedrock's is right.
    **dict.fromkeys(["claude-instant-v1", "claude-instant-1.2"], "litellm:anthropic.claude-instant-v1"),
    **dict.fromkeys(["claude-v1", "claude"], "litellm:anthropic.claude-v1"),
    **dict.fromkeys(["claude-v2", "claude-2"], "litellm:claude-2"),
    **dict.fromkeys(["claude-2.1", "claude-2.1_concise"], "litellm:claude-2.1"),
    **dict.fromkeys(
        ["gpt-3.5-turbo-1106_concise", "gpt-3.5-turbo-1106_verbose"], "litellm:gpt-3.5-turbo-1106"
    ),
    "gpt35_turbo_instruct": "litellm:gpt-3.5-turbo-instruct",
    "gpt4_0613_concise": "litellm:gpt-4-0613",
    "chatgpt-4o-latest-24-09-07": "litellm:chatgpt-4o-latest",
    # experimental snapshots: LiteLLM's exp entries are placeholder prices -> the production model
    "gemini-1.5-flash-exp-0827": "litellm:gemini-1.5-flash-002",
    **dict.fromkeys(["gemini-1.5-pro-exp-0801", "gemini-1.5-pro-exp-0827"], "litellm:gemini-1.5-pro-002"),
    **dict.fromkeys(
        ["yi-large", "yi-large-preview"], "litellm:fireworks_ai/accounts/fireworks/models/yi-large"
    ),
    # deliberately unpriced (no list price in any table): jina-chat, text_davinci_001,
    # text_davinci_003, reka-core-20240501, reka-flash-20240226
}

PRICE_COLUMNS = ("model", "input_per_mtok", "output_per_mtok", "context_window", "price_source")


def _prices_dir(data_dir: str | os.PathLike | None) -> Path:
    return source_dir(PRICES_FOLDER, data_dir)


@lru_cache(maxsize=4)
def _raw_tables(root: str) -> dict[str, dict]:
    """All price tables under the data root, keyed by table name (read once per root)."""
    prices = Path(root) / PRICES_FOLDER
    new, old = (json.loads((prices / f).read_text()) for f in LITELLM_FILES)
    old.pop("sample_spec", None)
    new.pop("sample_spec", None)
    arena = json.loads((prices / "routerarena_model_cost.json").read_text())
    return {"litellm": new, "litellm-2024": old, "routerarena": arena, "llmrouter": _candidates(root)}


#: parquet metadata key of the shipped table's prices: ``{model: {input_price, output_price}}``
SHIPPED_PRICES_KEY = b"router_ml.prices"


@lru_cache(maxsize=1)
def shipped_llmrouter_prices() -> dict[str, dict[str, float]]:
    """The scored llmrouter_ulab models' list prices ($ per 1M tokens), as the package ships them
    in its table's metadata (``python -m router_ml.data.default --rebuild`` writes them)."""
    import pyarrow.parquet as pq

    file = paths.SHIPPED_LLMROUTER_FILE
    raw = (pq.read_schema(file).metadata or {}).get(SHIPPED_PRICES_KEY)
    if raw is None:
        raise ValueError(
            f"{str(file)!r} carries no prices ({SHIPPED_PRICES_KEY.decode()!r} metadata); rebuild it"
        )
    return json.loads(raw)


@lru_cache(maxsize=4)
def _candidates(root: str) -> dict[str, dict]:
    """llmrouter_ulab's ``llm_candidates.json`` under the data root, else the prices shipped in the
    package (its scored models' numeric prices)."""
    path = Path(root) / "llmrouter_ulab" / "llm_candidates.json"
    return json.loads(path.read_text()) if path.is_file() else shipped_llmrouter_prices()


@lru_cache(maxsize=4)
def _shipped_price_table(root: str) -> pd.DataFrame:
    """The llmrouter pool's prices alone, for a data root without ``llm_prices`` (warned once)."""
    log.warning(
        "no price tables: no %r folder in the data folder %r (set %s to change it); pricing only the "
        "llmrouter_ulab models (from the prices shipped in the package); every other model "
        "stays unpriced",
        PRICES_FOLDER,
        root,
        DATA_DIR_ENV,
    )
    tables = {"llmrouter": _candidates(root)}
    hits = {m: _lookup(tables, key) for m, key in MODEL_PRICE_KEYS.items() if key.startswith("llmrouter:")}
    rows = [(m, *hit) for m, hit in hits.items() if hit is not None]
    return pd.DataFrame(rows, columns=list(PRICE_COLUMNS))


def _lookup(tables: dict[str, dict], key: str) -> tuple[float, float, float, str] | None:
    """(input $/1M, output $/1M, context window, source) of one price key, or None."""
    table, _, name = key.partition(":")
    if table == "litellm":
        for label, tbl in (
            ("litellm v1.110.2", tables["litellm"]),
            ("litellm v1.55.10", tables["litellm-2024"]),
        ):
            e = tbl.get(name)
            if e and e.get("input_cost_per_token") is not None and e.get("output_cost_per_token") is not None:
                ctx = e.get("max_input_tokens") or e.get("max_tokens")
                ctx = float(ctx) if isinstance(ctx, (int, float)) else math.nan
                if name.startswith("together-ai-"):  # a size-tier price, not a model: no context window
                    ctx = math.nan
                return (
                    e["input_cost_per_token"] * 1e6,
                    e["output_cost_per_token"] * 1e6,
                    ctx,
                    f"{label}: {name}",
                )
        return None
    if table == "litellm-2024":
        return _lookup({"litellm": {}, "litellm-2024": tables["litellm-2024"]}, f"litellm:{name}")
    if table == "routerarena":
        e = tables["routerarena"].get(name)
        if not e:
            return None
        ins, outs = e["input_token_price_per_million"], e["output_token_price_per_million"]
        return float(ins), float(outs), math.nan, f"routerarena: {name}"
    if table == "llmrouter":
        e = tables["llmrouter"].get(name)
        if not e:
            return None
        return (
            float(e["input_price"]),
            float(e["output_price"]),
            math.nan,
            f"llmrouter llm_candidates: {name}",
        )
    raise ValueError(
        f"price key {key!r}: unknown table {table!r}; use litellm, litellm-2024, routerarena or llmrouter"
    )


def load_price_table(data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Prices of every model in :data:`MODEL_PRICE_KEYS`.

    Returns a frame (n_models, 5): model, input_per_mtok, output_per_mtok (USD per 1M tokens),
    context_window (tokens, NaN where unknown), price_source ("<table>: <key>").
    Raises when a mapped key is missing from its table (a typo must not silently drop a price).
    """
    root = _prices_dir(data_dir).parent
    tables = _raw_tables(str(root.resolve()))
    rows, missing = [], []
    for model, key in MODEL_PRICE_KEYS.items():
        hit = _lookup(tables, key)
        if hit is None:
            missing.append(f"{model} -> {key}")
            continue
        rows.append((model, *hit))
    if missing:
        raise KeyError(f"price keys not found in the price tables under {str(root)!r}: {missing}")
    return pd.DataFrame(rows, columns=list(PRICE_COLUMNS))


def model_prices(models: Iterable[str], data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Prices of ``models`` (one row each, same order); NaN prices and a warning for unknown ones."""
    models = list(dict.fromkeys(models))
    root = paths.data_dir(data_dir)
    have_tables = (root / PRICES_FOLDER).is_dir()
    table = (load_price_table(data_dir) if have_tables else _shipped_price_table(str(root))).set_index(
        "model"
    )
    unknown = [m for m in models if m not in table.index]
    if unknown:
        fix = (
            "add them to router_ml.data.prices.MODEL_PRICE_KEYS"
            if have_tables
            else f"set {DATA_DIR_ENV} to a folder holding {PRICES_FOLDER!r}"
        )
        warnings.warn(f"no price for model(s) {unknown}: {fix}; their cost stays NaN", stacklevel=2)
    out = table.reindex(models)
    out.index.name = "model"
    return out.reset_index()


def price_coverage(models: Iterable[str]) -> float:
    """Share of distinct ``models`` that have a price key (0..1)."""
    models = set(models)
    return sum(m in MODEL_PRICE_KEYS for m in models) / max(len(models), 1)


def estimate_tokens(text: str) -> int:
    """Approximate token count: ceil(chars / 4) (OpenAI's rule of thumb for English)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def tokens_from_chars(chars: pd.Series | np.ndarray) -> np.ndarray:
    """Vectorised :func:`estimate_tokens` from character counts, shape (n,); NaN stays NaN."""
    return np.ceil(np.asarray(chars, dtype="float64") / CHARS_PER_TOKEN)


def attach_costs(df: pd.DataFrame, prices: pd.DataFrame | None = None) -> pd.DataFrame:
    """Fill ``input_tokens``, ``output_tokens`` and ``cost_usd`` where they are NaN.

    ``input_tokens`` <- estimate from the prompt; ``output_tokens`` <- the task's
    :data:`OUTPUT_TOKEN_PRIOR`; ``cost_usd`` <- (in x input price + out x output price) / 1e6.
    Measured values are never overwritten. ``prices`` is a :func:`model_prices` frame (default:
    looked up for the table's models); models without a price keep NaN cost (with a warning).
    """
    out = df.copy()
    for col in ("input_tokens", "output_tokens", "cost_usd"):
        out[col] = pd.to_numeric(out[col], errors="coerce") if col in out else np.nan
    if prices is None:
        prices = model_prices(out["model"].unique())
    else:
        unknown = sorted(set(out["model"]) - set(prices["model"]))  # NaN rows: already warned
        if unknown:
            warnings.warn(f"no price for model(s) {unknown}; their cost stays NaN", stacklevel=2)
    miss_in = out["input_tokens"].isna()
    if miss_in.any():
        out.loc[miss_in, "input_tokens"] = tokens_from_chars(out.loc[miss_in, "prompt"].str.len())
    miss_out = out["output_tokens"].isna()
    if miss_out.any():
        out.loc[miss_out, "output_tokens"] = (
            out.loc[miss_out, "task"].map(OUTPUT_TOKEN_PRIOR).astype("float64")
        )
    p = prices.drop_duplicates("model").set_index("model")
    pin = out["model"].map(p["input_per_mtok"]).astype("float64")
    pout = out["model"].map(p["output_per_mtok"]).astype("float64")
    est = (out["input_tokens"] * pin + out["output_tokens"] * pout) / 1e6
    out["cost_usd"] = out["cost_usd"].fillna(est)
    return out
