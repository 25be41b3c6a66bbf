"""ESC: Emulating Self-attention with Convolution (ICCV 2025)."""
import logging

import torch
import torch.nn as nn
from basicsr.utils.registry import ARCH_REGISTRY

from .layers import (
    ConvolutionalAttention,
    ESCTrunk,
    LargeKernel,
    PartialConvAttn,
    WindowAttention,
    check_kernel_size,
    check_upscaling_factor,
    conv_plus,
    pixel_shuffle,
    repeat_channels,
    resample_subpixel_conv,
    symmetrize_filter,
    unchanged,
)

logger = logging.getLogger('basicsr')


def _orthogonal_filter(pdim: int, kernel_size: int) -> nn.Parameter:
    check_kernel_size(kernel_size)
    weight = torch.empty(pdim, pdim, kernel_size, kernel_size)
    nn.init.orthogonal_(weight)
    return nn.Parameter(weight)


class SharedFilterTrunk(ESCTrunk):
    """An ESC trunk whose ConvAttns share one dense, symmetrised ``plk_filter``."""

    def __init__(self, dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, use_ln,
                 attn_type, deployment, flashbias_rank=None):
        super().__init__(dim, pdim, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, proj_ratio=2,
                         use_ln=use_ln, make_plk=ConvolutionalAttention, attn_type=attn_type, ln_last=False,
                         deployment=deployment, flashbias_rank=flashbias_rank)
        self.kernel_size = kernel_size
        self.plk_filter = _orthogonal_filter(pdim, kernel_size)

    def _follow_writes(self):
        # deployed, plk_filter holds the symmetrised filter (and its spectra are kept across images);
        # written since (BasicSR's EMA updates a deployed EMA model through .data), it is the trained
        # filter anew and symmetrised again, so the output is that of the undeployed model
        if self.deployed and not unchanged(self._deployed_filter, self.plk_filter):
            self._fold_filter()

    def large_kernel_filters(self):
        # torch.export traces fake tensors, whose values cannot be compared with the folded filter's:
        # its graph symmetrises plk_filter, as the undeployed model's
        folded = self.deployed and not torch.compiler.is_exporting()
        if folded:
            self._follow_writes()
        if folded and not (torch.is_grad_enabled() and self.plk_filter.requires_grad):
            return (self._large_kernel(self.plk_filter), )
        # symmetrised in the graph, also deployed (idempotent there): its gradient is projected on the
        # symmetric filters, as the undeployed model's, not that of the 8 symmetries' one tap
        return (self._large_kernel(symmetrize_filter(self.plk_filter)), )

    @torch.no_grad()
    def _fold_filter(self, trained=None):
        """Keep ``trained`` (default: plk_filter as it is) aside; plk_filter becomes its symmetrisation."""
        self._trained_filter = (self.plk_filter if trained is None else trained).detach().clone()
        self.plk_filter.copy_(symmetrize_filter(self._trained_filter.to(self.plk_filter.dtype)))
        self._deployed_filter = self.plk_filter.detach().clone()

    @torch.no_grad()
    def deploy(self):
        # Symmetrisation is idempotent: the stored filter gives the same output whether or not
        # a later model symmetrises it again, so deployed weights stay interchangeable. The
        # trained filter is kept aside: undeploy() restores it (training goes on from exactly
        # where it was) and a cast while deployed (.double()) symmetrises it anew in the new dtype,
        # instead of widening a filter rounded to the old one (2e-9 off in float64 otherwise).
        if not self.deployed:
            self._fold_filter()
        return super().deploy()

    def convert(self):
        """The authors' name for :meth:`deploy` (their ``model.convert()`` folds the symmetrised
        filter into ``plk_filter`` before inference, as deploy does)."""
        return self.deploy()

    @torch.no_grad()
    def undeploy(self):
        self._follow_writes()  # written while deployed: that is the filter to go on from
        if self.deployed and getattr(self, '_trained_filter', None) is not None:
            self.plk_filter.copy_(self._trained_filter)
        self._trained_filter = self._deployed_filter = None
        return super().undeploy()

    def _apply(self, fn, *args, **kwargs):
        self._follow_writes()  # written while deployed: that is the filter to cast
        trained = getattr(self, '_trained_filter', None)
        result = super()._apply(fn, *args, **kwargs)
        if self.deployed and trained is not None:
            self._fold_filter(fn(trained))
        return result


@ARCH_REGISTRY.register()
class ESC(SharedFilterTrunk):
    """ESC for classic (bicubic) super-resolution.

    Args:
        dim: feature channels. pdim: channels the convolutional attention changes.
        kernel_size: side of the shared large kernel (13 in every release).
        n_blocks: blocks. conv_blocks: ConvAttn + ConvFFN pairs per block.
        window_size: attention window side. num_heads: attention heads.
        upscaling_factor: scale. exp_ratio: ConvFFN expansion.
        use_ln: LayerNorm before each ConvFFN (ESC-XL). attn_type: 'auto', 'naive', 'sdpa', 'flex',
        or 'FlashBias' with ``flashbias_rank`` (the authors' ESC_FB releases; see ``WindowAttention``).
        deployment: call ``deploy()`` by itself on the first inference forward (the authors' key).

    A state dict trained at another scale loads: its ``to_img`` is re-sampled (one log line).
    """

    def __init__(self, dim: int, pdim: int, kernel_size: int, n_blocks: int, conv_blocks: int, window_size: int,
                 num_heads: int, upscaling_factor: int, exp_ratio: float = 2, use_ln: bool = False,
                 attn_type: str = 'auto', deployment: bool = False, flashbias_rank: int | None = None):
        check_upscaling_factor(upscaling_factor)
        super().__init__(dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, use_ln,
                         attn_type, deployment, flashbias_rank)
        self.upscaling_factor = upscaling_factor
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, padding=1)
        self.register_load_state_dict_pre_hook(_resample_to_img_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.upscaling_factor
        feat = self.features(x)
        # the input repeated per sub-pixel is added at LR, as the conv writes (CPU inference: one pass fewer)
        residual = repeat_channels(x, scale * scale, like=feat)
        return pixel_shuffle(conv_plus(self.to_img, feat, residual, winograd_tile=2), scale)  # 2: see conv_plus


def _resample_to_img_hook(module, state_dict, prefix, *args):
    resample_subpixel_conv(state_dict, prefix, 3, module.upscaling_factor, log=logger.info)


@ARCH_REGISTRY.register()
class ConvAttn(PartialConvAttn):
    """ESC's convolutional attention as a stand-alone layer, with its own large kernel.

    Args:
        dim: channels in and out. pdim: channels the attention changes (the rest pass through).
        kernel_size: side of the large kernel.
        symmetric: symmetrise the large kernel over the 8 symmetries of the square (as ESC).

    Input and output: (B, dim, H, W).
    """

    def __init__(self, dim: int, pdim: int, kernel_size: int = 13, symmetric: bool = True):
        if not 0 < pdim <= dim:
            raise ValueError(f'pdim ({pdim}) must be in 1..dim ({dim})')
        super().__init__(dim, pdim, ConvolutionalAttention(pdim))
        self.symmetric = symmetric
        self.plk_filter = _orthogonal_filter(pdim, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lk_filter = symmetrize_filter(self.plk_filter) if self.symmetric else self.plk_filter
        return super().forward(x, LargeKernel(lk_filter))


ARCH_REGISTRY.register(WindowAttention)
