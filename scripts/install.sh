#!/usr/bin/env bash
# Installs raylab and everything it needs into a virtual environment.
#
#   scripts/install.sh            # .venv (created if no virtual environment is active)
#   VENV=/path scripts/install.sh # another location
#   TORCH_SPEC="torch==2.13.0" scripts/install.sh   # choose the torch build yourself
#
# torch comes first, chosen for the machine: with an NVIDIA GPU (nvidia-smi works) the
# default PyPI build (CUDA); without one the CPU build, so a CPU-only laptop or CI machine
# does not download several GB of CUDA wheels. An already installed torch is kept.
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

pipq -e ".[${EXTRAS}]"
python -c "import raylab, torch, ray; print(f'raylab install: ok (ray {ray.__version__}, torch {torch.__version__})')"
