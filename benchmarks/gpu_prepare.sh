#!/usr/bin/env bash
# Run here, before benchmarks/run_gpu.sh on a lent GPU machine: that machine has PyTorch (and
# pytest, tqdm, yaml, opencv, matplotlib) but no network and no BasicSR. This copies BasicSR's
# pure-Python package from the active environment and the parity fixtures (ESC_SHARED, default
# ../shared) into .gpu/ (git-ignored; ~2 MB), which the run carries along.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(python -c "import os, esc_arch, basicsr; print(os.path.dirname(os.path.dirname(basicsr.__file__)))")
shared=${ESC_SHARED:-$(cd .. && pwd)/shared}
rm -rf .gpu
mkdir -p .gpu/site .gpu/shared
cp -r "$site/basicsr" .gpu/site/
cp -r "$shared/reference" .gpu/shared/
find .gpu -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
