#!/usr/bin/env bash
# A lent GPU machine's checks, prepared as one command (device time is short and each
# start costs minutes). There, python3 already has a CUDA torch, Triton, numpy, Pillow,
# matplotlib, tqdm and pytest; nothing needs installing.
#
#     bash benchmarks/gpu_session.sh [DATA_DIR]
#
# 1. The GPU tests: the Triton kernels and the CUDA graph, each spread of the kernels
#    against float64, the same bits run to run, training, Ctrl-C and --resume.
# 2. Per step of 128 on the book recipe: Triton kernels spread "image" and "split" (the
#    default), and cuDNN (benchmarks/gpu_speed.py --only steps-book), then each spread's
#    kernels by GPU time (profile, profile-split).
# 3. With DATA_DIR (a folder of Fashion-MNIST's IDX files, carried along: copy them into an
#    ignored folder of the checkout, say .gpudata, and name it in the run's carry), whole
#    `lenet train --preset book --device cuda` processes: the default, spread "image"
#    (LENET_TRITON_SPREAD=image) and eager (--only runs-book); then the training loop's
#    host time per step (benchmarks/gpu_loop_profile.py).
# Logs go to $OUT (the device tool's folder that comes back), else /tmp/gpu_session.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$here"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_book.py tests/test_cuda_graph.py \
    2>&1 | tee "$out/tests.log"
python3 benchmarks/gpu_speed.py --only steps-book,profile,profile-split --steps 200 \
    2>&1 | tee "$out/speed.log"
if [ $# -ge 1 ]; then
    python3 benchmarks/gpu_speed.py --only runs-book --data "$1" 2>&1 | tee "$out/runs.log"
    python3 benchmarks/gpu_loop_profile.py "$1" 2>&1 | tee "$out/loop.log"
fi
