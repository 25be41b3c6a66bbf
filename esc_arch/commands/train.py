"""``basicsr train -opt FILE.yml``: BasicSR's ``train_pipeline`` with the ESC family registered.

Same flags as BasicSR's ``train.py``; experiments/ and tb_logger/ are created in the current
directory. Any arch in ARCH_REGISTRY trains (ESC, SwinIR, EDSR, RCAN, ...). Multi-process:
``torchrun --nproc_per_node=N -m esc_arch.cli train -opt FILE.yml --launcher pytorch``
(gloo on CPU, nccl on CUDA).
"""
from . import _pipeline


def add_arguments(parser):
    _pipeline.add_arguments(parser)


def run(args) -> int:
    return _pipeline.run('train', args)
