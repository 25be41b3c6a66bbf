#!/usr/bin/env bash
# The CPU comparison: ESC, ESC-light, ESC-FP vs SwinIR-light and EDSR-baseline, x4,
# LR 180x320 (1280x720 output), fp32, all cores, 1 warm-up + 5 timed runs, each arch in a fresh
# process; with a float64 check of every output. Run it on a quiet machine.
# ESC pads to its window internally (as in the paper), so it runs at 180x320 with --no-pad;
# SwinIR-light needs its input padded to a multiple of 8 (184x320); EDSR needs no padding.
# Records and the plot go to benchmarks/cpu_fp32/. Extra arguments are passed on (the last
# value wins), e.g. a quick smoke test:  benchmarks/run_cpu.sh --lr-size 48x64 --runs 2 --out /tmp/b
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--scale 4 --lr-size 180x320 --device cpu --dtype fp32 --runs 5 --warmup 1 --check --out benchmarks/cpu_fp32)
basicsr bench --preset esc --preset esc-light --preset esc-fp --no-pad "${common[@]}" "$@"
basicsr bench --preset swinir-light --preset edsr-baseline "${common[@]}" "$@"
