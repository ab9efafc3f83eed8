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
# Data-parallel case: NCCL, one process per GPU (needs 2+ GPUs: NCCL refuses two ranks on
# one device). Its failure is reported, not fatal: the tables above are already printed.
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  torchrun --standalone --nproc-per-node="$NGPU" -m divebench run suite=cifar10 data=fake subset=1024 epochs=2 \
    seeds=1 policy=divebatch,adabatch divebatch.resize_freq=1 adabatch.resize_freq=1 device=cuda \
    results_dir="${TMPDIR:-/tmp}/gpu_check_ddp" wandb=off --no-report \
    || echo "gpu_check: the data-parallel case (torchrun, $NGPU GPUs, NCCL) failed: see above"
else
  echo "gpu_check: data-parallel case skipped ($NGPU GPU visible; NCCL needs one process per GPU, 2+ GPUs)"
fi
