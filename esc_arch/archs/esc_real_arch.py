"""ESC-Real: ESC for real-world degradations (x4)."""
import torch
import torch.nn as nn
from basicsr.utils.registry import ARCH_REGISTRY

from .esc_arch import SharedFilterTrunk
from .layers import conv_plus, inference_layout


@ARCH_REGISTRY.register()
class ESCReal(SharedFilterTrunk):
    """ESC-Real (x4 only).

    Args: as ESC, without ``use_ln`` (every ConvFFN has a LayerNorm before it); ``use_dysample``
    (the authors' option) must stay false. Adds an input
    branch ``skip`` (1x1, depthwise 7x7 reflect, LeakyReLU, 1x1) and a nearest-neighbour +
    conv upsampler as ``to_img``; no image skip.
    """

    def __init__(self, dim: int, pdim: int, kernel_size: int, n_blocks: int, conv_blocks: int, window_size: int,
                 num_heads: int, upscaling_factor: int = 4, exp_ratio: float = 2, attn_type: str = 'auto',
                 deployment: bool = False, use_dysample: bool = False, flashbias_rank: int | None = None):
        if use_dysample:  # the authors' option (default false), for which they release no weights
            raise ValueError('ESCReal: use_dysample: true (a DySample upsampler) is not supported; the released '
                             'ESC-Real upsamples by nearest neighbour + convs (use_dysample: false)')
        if upscaling_factor != 4:
            raise ValueError(f'ESCReal supports upscaling_factor 4 only, got {upscaling_factor}')
        super().__init__(dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, exp_ratio,
                         use_ln=True, attn_type=attn_type, deployment=deployment, flashbias_rank=flashbias_rank)
        self.upscaling_factor = upscaling_factor
        self.to_img = nn.Sequential(
            nn.Upsample(scale_factor=2, mode='nearest'),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2, mode='nearest'),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim, 3, 3, padding=1),
        )
        self.skip = nn.Sequential(
            nn.Conv2d(3, dim * 2, 1),
            nn.Conv2d(dim * 2, dim * 2, 7, padding=3, groups=dim * 2, padding_mode='reflect'),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim * 2, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 4:  # PyTorch's own message names neither the model nor the way out
            raise ValueError(f'ESCReal needs inputs of at least 4x4 pixels (its skip branch reflect-pads a 7x7 '
                             f'conv by 3), got {x.shape[-2]}x{x.shape[-1]}; pad the image first (esc_arch.Upscaler '
                             'and basicsr upscale do)')
        x = inference_layout(x)
        feat = self.features(x) + self.skip(x)
        for layer in self.to_img:  # its 3x3 convs through conv_plus (Winograd at CPU inference)
            feat = conv_plus(layer, feat) if isinstance(layer, nn.Conv2d) else layer(feat)
        return feat.contiguous()
