"""ESC-FP: ESC with a decomposed (1x1 + depthwise) large kernel, for fast inference."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY

from .esc_arch import _resample_to_img_hook
from .layers import (
    DecomposedConvolutionalAttention,
    ESCTrunk,
    accumulate,
    check_kernel_size,
    check_upscaling_factor,
    conv_plus,
    pixel_shuffle,
)


@ARCH_REGISTRY.register()
class ESCFP(ESCTrunk):
    """ESC-FP.

    Args: as ESC, without ``use_ln`` (every ConvFFN has a LayerNorm before it). The output is
    pixel_shuffle(to_img(features)) plus a bicubic upsampling of the input.
    """

    def __init__(self, dim: int, pdim: int, kernel_size: int, n_blocks: int, conv_blocks: int, window_size: int,
                 num_heads: int, upscaling_factor: int, exp_ratio: float = 2, attn_type: str = 'auto',
                 deployment: bool = False, flashbias_rank: int | None = None):
        check_kernel_size(kernel_size)
        check_upscaling_factor(upscaling_factor)
        super().__init__(dim, pdim, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, proj_ratio=1.5,
                         use_ln=True, make_plk=DecomposedConvolutionalAttention, attn_type=attn_type, ln_last=True,
                         deployment=deployment, flashbias_rank=flashbias_rank)
        self.kernel_size = kernel_size
        self.upscaling_factor = upscaling_factor
        self.lk_channel = nn.Parameter(torch.randn(pdim, pdim, 1, 1))
        self.lk_spatial = nn.Parameter(torch.empty(pdim, 1, kernel_size, kernel_size))
        nn.init.orthogonal_(self.lk_spatial)
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, padding=1)
        self.register_load_state_dict_pre_hook(_resample_to_img_hook)

    def large_kernel_filters(self):
        return self.lk_channel, self._large_kernel(self.lk_spatial, depthwise=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.upscaling_factor
        out = pixel_shuffle(conv_plus(self.to_img, self.features(x), winograd_tile=2), scale)  # 2: see conv_plus
        return accumulate(out, F.interpolate(x, scale_factor=scale, mode='bicubic'))
