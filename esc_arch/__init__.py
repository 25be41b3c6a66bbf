"""esc-arch: the ESC super-resolution family as a BasicSR plugin.

Importing this package makes BasicSR importable on current torchvision and registers the
ESC archs (and our training model and data sets) into BasicSR's registries.
"""
from . import (  # noqa: E402,F401  (registration)
           compat,  # noqa: F401  (must come before anything imports basicsr)
           data,
           models,
)
from .archs import ESC, ESCFP, ConvAttn, ESCReal, WindowAttention  # noqa: E402
from .inference import Upscaler, read_image, write_image  # noqa: E402
from .loading import build_from_state_dict, infer_config, load_model  # noqa: E402
from .runtime import tune_cpu_allocator  # noqa: E402

__version__ = '0.1.0'
__all__ = ['ESC', 'ESCFP', 'ESCReal', 'ConvAttn', 'WindowAttention', 'load_model', 'infer_config',
           'build_from_state_dict', 'tune_cpu_allocator', 'Upscaler', 'read_image', 'write_image']
