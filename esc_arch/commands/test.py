"""``basicsr test -opt FILE.yml``: BasicSR's ``test_pipeline`` with the ESC family registered.

Same flags as BasicSR's ``test.py``; results/<name>/ is created in the current directory,
with the super-resolved images and a log holding the metrics (PSNR, SSIM, ...).
"""
from . import _pipeline


def add_arguments(parser):
    _pipeline.add_arguments(parser, is_train=False)


def run(args) -> int:
    return _pipeline.run('test', args)
