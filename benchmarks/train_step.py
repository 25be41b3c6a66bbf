"""Time ESC training steps on the CPU: forward + L1 loss + backward + Adam step.

The setting of the released x4 models: batch 16, GT 256 (LR 64x64), fp32, all cores.
  python benchmarks/train_step.py [--steps 3] [--batch 16] [--gt 256] [--threads N]
Prints one line per step and the median; compare two versions in one run on a quiet machine.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from esc_arch import ESC
from esc_arch.benchmark import PRESETS
from esc_arch.runtime import tune_cpu_allocator


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=3, help='timed steps (after one warm-up step)')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--gt', type=int, default=256, help='GT patch size (LR = GT / 4)')
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = dict(PRESETS['esc'][1], upscaling_factor=4)  # the released ESC x4
    model = ESC(**config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    lr = torch.rand(args.batch, 3, args.gt // 4, args.gt // 4)
    gt = torch.rand(args.batch, 3, args.gt, args.gt)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(lr), gt)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        print(f'step {step}{" (warm-up)" if step == 0 else ""}: {elapsed:.2f} s')
        if step:
            times.append(elapsed)
    print(f'median {statistics.median(times):.2f} s per step (batch {args.batch}, GT {args.gt}, '
          f'{torch.get_num_threads()} threads)')


if __name__ == '__main__':
    main()
