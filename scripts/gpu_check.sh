#!/usr/bin/env bash
# The one command that checks the CUDA path on a GPU machine (under 5 minutes on one GPU):
# the CUDA tests, then a short throughput table (images/s per policy, batch 128 and 2048).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')"
python -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
pytest -q tests/test_cuda.py tests/test_augment.py
python scripts/gpu_throughput.py off
python scripts/gpu_throughput.py bf16
