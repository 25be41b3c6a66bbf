"""ESC archs; importing this package registers them in BasicSR's ARCH_REGISTRY."""
from .esc_arch import ESC, ConvAttn
from .esc_fp_arch import ESCFP
from .esc_real_arch import ESCReal
from .layers import ESCBlock, WindowAttention

__all__ = ['ESC', 'ESCFP', 'ESCReal', 'ConvAttn', 'WindowAttention', 'ESCBlock']
