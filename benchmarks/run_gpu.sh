#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine (see the README's "Speed" section):
#   here:  benchmarks/gpu_prepare.sh
#   there: run(command="bash benchmarks/run_gpu.sh", carry=[".gpu"], timeout_s=540)
# 1. tests/test_cuda.py (the authors' fixtures on CUDA with every attention backend, fp16/bf16,
#    a training step against the written-out attention, `basicsr bench --device cuda`);
# 2. `basicsr bench` x4, LR 180x320 -> 1280x720, 20 runs after 3 warm-ups, float64 check:
#    ESC with SDPA and with flex attention in fp32 (PyTorch's defaults: cuDNN in TF32), fp16 and
#    bf16, then ESC-light, ESC-FP, SwinIR-light and EDSR-baseline in fp32 and fp16.
# Logs and a tarball of the records (and plots) go to $OUT (default benchmarks/cuda).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/cuda}
work=$(mktemp -d)
mkdir -p "$dest"
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" ESC_SHARED="$PWD/.gpu/shared" PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  >"$dest/env.txt" 2>&1
# flex compiles are CPU-bound: spread the tests over 4 processes where pytest-xdist is installed
parallel=(); python3 -c "import xdist" 2>/dev/null && parallel=(-n 4)
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfEs "${parallel[@]}" tests/test_cuda.py 2>&1 | tee "$dest/tests.log"
bench() {  # bench DTYPE ARGS...: one folder of records (and one plot) per dtype
  local dtype=$1
  shift
  timeout 150 python3 -m esc_arch.cli bench --device cuda --scale 4 --lr-size 180x320 --runs 20 --warmup 3 --check \
    --no-progress --out "$work/cuda_$dtype" --dtype "$dtype" "$@" 2>&1 | tee -a "$dest/bench.log"
}
# most wanted first (the device time may run out): ESC's backends, then the other archs
for dtype in fp32 fp16 bf16; do
  bench "$dtype" --no-pad --preset esc:attn_type=sdpa --preset esc:attn_type=flex
done
for dtype in fp32 fp16; do
  bench "$dtype" --no-pad --preset esc-light --preset esc-fp
  bench "$dtype" --preset swinir-light --preset edsr-baseline
done
tar czf "$dest/records.tar.gz" -C "$work" .
ls -l "$dest"
