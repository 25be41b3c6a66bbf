"""Layers shared by every ESC family member (ESC, ESC-FP, ESC-Real).

State-dict names are the authors' so that released checkpoints load with ``strict=True``.
Every fast path lives next to the plain computation it replaces; tests prove they agree.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import (
    conv1x1_op,
    conv1x1_preferred,
    conv3x3_op,
    conv_attn_merge_op,
    conv_ffn_op,
    fused_attention_applies,
    layer_norm_op,
    onednn_conv_add_op,
    pad_planes_op,
    spectral_mix_op,
    window_attention_op,
)

ATTN_TYPES = ('auto', 'naive', 'sdpa', 'flex')
# the authors' FlashBias variants (ESC_FB_*): the bias as the product of two learnt low-rank factors,
# a layout of its own (flashbias_q / flashbias_k instead of the table); computed as SDPA is
FLASHBIAS = 'flashbias'
_DEPLOY_LOCK = threading.Lock()  # not per model: a lock would make models unpicklable


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom/right of ``x`` so H and W become multiples of ``multiple``.

    ``F.pad(mode='reflect')`` needs the pad to be smaller than the size; for inputs smaller
    than that (tiny images, tiny windows) the reflection is applied repeatedly, and a
    1-pixel axis, which has nothing to reflect, is replicated (that axis only: the other one is
    still reflected, as ``padded_positions`` maps it for the fused attention kernel).
    """
    for dim in (-2, -1):  # one axis at a time (reflection is separable), each by its own rule
        pad = (-x.shape[dim]) % multiple
        while pad:
            size = x.shape[dim]
            step = min(pad, size - 1) if size > 1 else pad
            x = F.pad(x, (0, step, 0, 0) if dim == -1 else (0, 0, 0, step), mode='reflect' if size > 1 else 'replicate')
            pad -= step
    return x


def padded_positions(size: int, multiple: int) -> torch.Tensor:
    """For each position along an axis padded by ``reflect_pad_to_multiple``, the position of the
    input it copies (int64; the first ``size`` map to themselves)."""
    index = torch.arange(size, dtype=torch.float64).view(1, 1, size, 1).expand(1, 1, size, multiple)
    return reflect_pad_to_multiple(index, multiple)[0, 0, :, 0].long()  # the width needs no padding


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_whole(name: str, value, minimum: int = 1) -> None:
    """A size or count: a whole number (not a bool, nor a float such as 8.0) of at least ``minimum``."""
    if not (_is_whole(value) and value >= minimum):
        raise ValueError(f'{name} must be a whole number >= {minimum}, got {value!r}')


def check_kernel_size(kernel_size: int) -> None:
    """Large kernels are centred on their pixel ('same' padding): an odd size."""
    if not (_is_whole(kernel_size) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f'kernel_size must be an odd number >= 1, got {kernel_size!r}')


def check_upscaling_factor(scale: int) -> None:
    check_whole('upscaling_factor', scale)


def unchanged(kept: torch.Tensor | None, current: torch.Tensor) -> bool:
    """Whether ``current`` still holds the values of ``kept`` (a copy made when something was
    derived from it: a dense bias, a symmetrised filter, FFT spectra). Compared, not versioned:
    writes through ``.data`` (BasicSR's EMA) or under ``inference_mode`` bump no version counter.
    On the CPU through NumPy (``torch.equal`` wakes PyTorch's thread pool: 1.5-8 ms on a busy 2-core
    host against ~30 us); on a GPU, where comparing would wait for the device, a copy of the same
    dtype and shape counts as unchanged (callers keep derived values there only while deployed)."""
    if kept is None or kept.dtype != current.dtype or kept.device != current.device or kept.shape != current.shape:
        return False
    if current.device.type != 'cpu':
        return True
    if current.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.array_equal(kept.numpy(), current.detach().numpy()))
    return torch.equal(kept, current.detach())


def symmetrize_filter(kernel: torch.Tensor) -> torch.Tensor:
    """Mean of ``kernel`` (.., K, K) over the 8 symmetries of the square (dihedral group)."""
    rot = torch.rot90(kernel, -1, (-2, -1))
    images = [kernel, rot]
    images += [k.flip(-1) for k in (kernel, rot)]
    images += [k.flip(-2) for k in (kernel, rot)]
    images += [k.flip((-2, -1)) for k in (kernel, rot)]
    return torch.stack(images).mean(0)


def tracing() -> bool:
    """True while exporting (ONNX / TorchScript) or compiling (``torch.compile``, ``torch.export``):
    graph-friendly code paths are used, not the CPU kernels (whose in-place ops on complex views
    the compiler's functionalization cannot take)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def cpu_float32_inference(x: torch.Tensor) -> bool:
    """x is a float32 CPU tensor and autograd and export are off: where the CPU kernels
    (esc_arch/kernels) may take over from PyTorch's operators."""
    return x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_grad_enabled() and not tracing()


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """Inference on the CPU runs channels-last (NHWC): there oneDNN's 1x1, depthwise and 3x3
    convolutions are 20-45% faster than on NCHW, and LayerNorm and window attention read
    the channels contiguously without transposes. Training, other devices and export keep
    NCHW. Every layer computes the same values in either layout."""
    if x.device.type == 'cpu' and x.dim() == 4 and not torch.is_grad_enabled() and not tracing():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def is_channels_last(x: torch.Tensor) -> bool:
    """A dense channels-last 4-D tensor that is not also plain contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def gelu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Exact GELU; a channels-last tensor goes through as the dense NHWC tensor it is (PyTorch's
    CPU kernel is ~1.5x slower when it sees the channels-last strides). ``inplace``: x is a
    temporary of the caller's, overwritten when autograd is off."""
    dense = x.permute(0, 2, 3, 1) if is_channels_last(x) else x
    if inplace and not torch.is_grad_enabled():
        torch.ops.aten.gelu_(dense)
        return x
    out = F.gelu(dense)
    return out.permute(0, 3, 1, 2) if dense is not x else out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear``; without autograd the bias is added in place after the product: PyTorch's
    addmm first fills its fresh output with the broadcast bias (ESC's qkv projection at 180x320
    on the CPU: 10.8 ms -> 7.6 ms)."""
    if torch.is_grad_enabled() or tracing():
        return F.linear(x, weight, bias)
    return torch.matmul(x, weight.t()).add_(bias)


def accumulate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, written into x when autograd is off (x must be a temporary of the caller's)."""
    return x + y if torch.is_grad_enabled() else x.add_(y)


def conv_accumulate(residual: torch.Tensor | None, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``accumulate(residual, conv(x))`` (just ``conv(x)`` without a residual). At CPU float32
    inference on channels-last maps the convolution is added into ``residual`` as it is computed:
    one pass over memory fewer (by oneDNN, ESC's 1x1 at 180x320, 2 threads: 2.0 -> 1.55 ms; a 1x1
    by ``conv1x1`` where that is preferred, see ``conv_plus``). ``residual``: a temporary of the
    caller's."""
    if residual is None:
        return conv(x)
    if _conv1x1_applies(conv, x, residual):
        conv1x1_op()(x.permute(0, 2, 3, 1), conv.weight.view(conv.out_channels, -1), conv.bias,
                     residual.permute(0, 2, 3, 1), residual.permute(0, 2, 3, 1))
        return residual
    op = onednn_conv_add_op()
    if (op is None or not cpu_float32_inference(x) or conv.weight.dtype != torch.float32
            or residual.dtype != torch.float32 or not (is_channels_last(x) and is_channels_last(residual))
            or conv.padding_mode != 'zeros' or isinstance(conv.padding, str)):
        return accumulate(residual, conv(x))
    return op(residual, x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
              conv.groups, 'add', 1.0, None, [], None)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``F.pixel_shuffle(x, scale)``, contiguous. On a channels-last map (the CPU inference layout)
    it is one copy, where PyTorch's pixel_shuffle and ``.contiguous()`` copy twice."""
    if not is_channels_last(x):
        return F.pixel_shuffle(x, scale).contiguous()
    b, c, h, w = x.shape
    planes = c // (scale * scale)
    pixels = x.permute(0, 2, 3, 1).reshape(b, h, w, planes, scale, scale)
    return pixels.permute(0, 3, 1, 4, 2, 5).reshape(b, planes, h * scale, w * scale)


def repeat_channels(x: torch.Tensor, repeats: int, like: torch.Tensor) -> torch.Tensor:
    """``torch.repeat_interleave(x, repeats, dim=1)`` in ``like``'s memory layout (so a channels-last
    one can be the residual that ``conv_plus`` adds as it writes)."""
    if not is_channels_last(like):
        return torch.repeat_interleave(x, repeats, dim=1)
    return x.permute(0, 2, 3, 1).repeat_interleave(repeats, dim=-1).permute(0, 3, 1, 2)


# Winograd's larger tiles, F(4x4, 3x3), from this many pixels on: 4x fewer products than a direct
# convolution where F(2x2, 3x3) has 2.25x, but a larger fixed cost per call (its 36-point filter
# transform) and a larger rounding error (~1.6e-6 of the largest output against ~1e-7 for ESC's
# 64 -> 64 at 180x320, default init; up to 9.3e-6 relative over 600 random layers and sizes).
# The models' output convolutions (``to_img``) keep F(2x2): their rounding
# lands in the image itself (ESC x4 at 180x320, default init, max error against float64: all
# F(2x2) 1.73e-6, all F(4x4) 7.52e-6, F(4x4) but for to_img 2.13e-6). The kernel alone, 64 -> 64
# with a residual, AMD EPYC, 2 threads, medians, F(2x2) vs F(4x4): 32x32 0.53-0.56 vs 0.79-0.81 ms,
# 64x64 1.36-1.39 vs 1.44-1.45 ms, 96x96 2.95-3.09 vs 2.47-2.60 ms, 180x320 19.8-21.4 vs
# 15.3-18.1 ms, 64 -> 48 at 180x320 12.9-14.4 vs 9.9-11.2 ms, 720x1280 265-287 vs 190-196 ms. The
# threshold lies between the sizes measured slower (64x64) and faster (96x96).
WINOGRAD_F4_MIN_PIXELS = 80 * 80


def conv_plus(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None,
              winograd_tile: int | None = None) -> torch.Tensor:
    """``conv(x) + residual`` (just ``conv(x)`` without one), a new tensor. At CPU float32 inference
    on channels-last maps a 3x3 convolution (stride 1, padding 1, channels multiples of 8) runs the
    CPU kernels' Winograd convolution (``conv3x3``), adding the residual as it writes its output:
    F(``winograd_tile`` x ``winograd_tile``, 3x3), 2 or 4, by default 4 from
    ``WINOGRAD_F4_MIN_PIXELS`` on, else 2 (ESC's 64 -> 64 at 180x320, 2 threads, Xeon, F(2x2): 8.0 ms
    against oneDNN's 13.2 ms). In the AVX2 build a 1x1 one (stride 1, no padding, output channels a
    multiple of 8) runs ``conv1x1``, GEMMs of the CPU kernels (see ``conv1x1_preferred``)."""
    winograd = False
    if _conv1x1_applies(conv, x, residual):
        op = conv1x1_op()
    else:
        winograd = _winograd_applies(conv, x, residual)
        op = conv3x3_op() if winograd else None
    if op is None:
        return conv(x) if residual is None else accumulate(conv(x), residual)
    b, _, h, w = x.shape
    out = x.new_empty(b, h, w, conv.out_channels)
    pixels, res = x.permute(0, 2, 3, 1), None if residual is None else residual.permute(0, 2, 3, 1)
    if winograd:
        tile = winograd_tile or (4 if h * w >= WINOGRAD_F4_MIN_PIXELS else 2)
        op(pixels, conv.weight, conv.bias, res, out, tile)
    else:
        op(pixels, conv.weight.view(conv.out_channels, -1), conv.bias, res, out)
    return out.permute(0, 3, 1, 2)


def _residual_fits(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    b, _, h, w = x.shape
    return residual is None or (residual.dtype == torch.float32 and is_channels_last(residual)
                                and residual.shape == (b, conv.out_channels, h, w))


def _weight_fits(conv: nn.Conv2d) -> bool:
    """The kernels read a float32 weight in its default layout (a model moved to channels-last
    memory format has 3x3 weights that are not)."""
    return conv.weight.dtype == torch.float32 and conv.weight.is_contiguous()


def _winograd_applies(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (cpu_float32_inference(x) and is_channels_last(x) and _weight_fits(conv)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == 'zeros'
            and conv.bias is not None and conv.in_channels % 8 == 0 and conv.out_channels % 8 == 0
            and _residual_fits(conv, x, residual))


def _conv1x1_applies(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (cpu_float32_inference(x) and is_channels_last(x) and _weight_fits(conv)
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1 and conv.bias is not None and conv.out_channels % 8 == 0
            and _residual_fits(conv, x, residual) and conv1x1_preferred())


# elements per chunk of to_channels_first: a (chunk, C) -> (C, chunk) transpose that stays in
# cache is ~2.5x faster on the CPU than PyTorch's one-shot NHWC -> NCHW copy
_TRANSPOSE_CHUNK = 1 << 16


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> contiguous (B, C, H, W), the same values."""
    b, h, w, c = x.shape
    rows = max(_TRANSPOSE_CHUNK // max(b * c, 1), 1)
    if x.device.type != 'cpu' or tracing() or h * w <= rows or (torch.is_grad_enabled() and x.requires_grad):
        return x.permute(0, 3, 1, 2).contiguous()
    src = x.reshape(b, h * w, c)
    out = x.new_empty(b, c, h * w)
    for start in range(0, h * w, rows):
        out[:, :, start:start + rows].copy_(src[:, start:start + rows].transpose(1, 2))
    return out.view(b, c, h, w)


def _fft_friendly(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3, 5, 7 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


# Inference on the CPU convolves large kernels (>= FFT_MIN_KERNEL) through the FFT on images of
# at least FFT_MIN_PIXELS pixels; training (autograd), other devices/dtypes and export keep the
# direct convolution.
FFT_MIN_PIXELS = 32 * 32
FFT_MIN_KERNEL = 7


def use_fft(x: torch.Tensor, kernel: torch.Tensor) -> bool:
    return (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64) and not tracing()
            and kernel.shape[-1] >= FFT_MIN_KERNEL and x.shape[-2] * x.shape[-1] >= FFT_MIN_PIXELS
            and not (torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)))


def _fft_plan(x: torch.Tensor, k: int):
    """FFT size for a linear (not circular) 'same' convolution, and the crop back to H x W."""
    h, w = x.shape[-2:]
    pad = k // 2
    return (_fft_friendly(h + k - 1), _fft_friendly(w + k - 1)), (..., slice(pad, pad + h), slice(pad, pad + w))


def _kernel_spectrum(kernel: torch.Tensor, size) -> torch.Tensor:
    return torch.fft.rfft2(kernel.flip(-2, -1), s=size)  # conv2d is a correlation: flip


def _factored_spectrum(kernel: torch.Tensor, size) -> tuple:
    """The spectrum about its centre of a (in, out, K, K) filter mirror-symmetric in both axes,
    as ``spectral_mix`` takes it: K[i, o, u, v] = sum_t rows[u, i, o, t] cols[t, v] with
    rows (H, in, out, K // 2 + 1) and cols (K // 2 + 1, W // 2 + 1) for an FFT of size (H, W).
    Taps at offsets (+-a, +-t) share a weight, so the spectrum is the sum over a, t >= 0 of
    m_a m_t w[a, t] cos(2 pi u a / H) cos(2 pi v t / W), m = 1 at 0 and 2 elsewhere; computed in
    float64, returned in the filter's dtype."""
    (height, width), centre = size, kernel.shape[-1] // 2
    quarter = kernel.double()[..., centre:, centre:]  # (in, out, a, t)
    weight = torch.full((centre + 1,), 2.0, dtype=torch.float64)
    weight[0] = 1.0

    def cosines(n, length):  # (n, taps): cos(2 pi f a / length)
        return torch.cos(2 * math.pi * torch.outer(torch.arange(n, dtype=torch.float64),
                                                   torch.arange(centre + 1, dtype=torch.float64)) / length)
    rows = torch.einsum('ioat,ua->uiot', quarter * torch.outer(weight, weight), cosines(height, height))
    return rows.to(kernel.dtype).contiguous(), cosines(width // 2 + 1, width).T.to(kernel.dtype).contiguous()


def per_sample_depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise conv where every sample has its own kernel.

    x: (B, C, H, W); kernel: (B*C, 1, k, k), sample-major. Padding k//2. The batch is folded
    into the conv groups; large kernels at inference go through the FFT (ESC-FP's 13x13);
    while tracing, where groups cannot depend on the batch size, the same sum is written as
    k*k shifted products.
    """
    b, c, h, w = x.shape
    k = kernel.shape[-1]
    if tracing():
        weights = kernel.reshape(-1, c, k * k, 1, 1)
        padded = F.pad(x, [k // 2] * 4)
        terms = [padded[:, :, i:i + h, j:j + w] * weights[:, :, i * k + j] for i in range(k) for j in range(k)]
        return torch.stack(terms).sum(0)
    if use_fft(x, kernel):
        size, crop = _fft_plan(x, k)
        spectrum = torch.fft.rfft2(x, s=size) * _kernel_spectrum(kernel.view(b, c, k, k).to(x.dtype), size)
        return torch.fft.irfft2(spectrum, s=size)[crop]
    out = F.conv2d(x.reshape(1, b * c, h, w), kernel, padding=k // 2, groups=b * c)
    return out.view(b, c, h, w)


class LargeKernel:
    """A K x K filter shared by many convolutions of one forward pass: dense (out, in, K, K), or
    depthwise (C, 1, K, K) with ``depthwise=True`` (ESC-FP's ``lk_spatial``).

    ``lk(x)`` equals ``F.conv2d(x, weight, padding=K//2)`` (``groups=C`` if depthwise). At
    inference on the CPU (see ``use_fft``) it convolves through the FFT instead, with the filter's
    spectrum computed once per image size and reused by every ConvAttn (ESC has 25), which turns
    ~0.1 s dense 13x13 convolutions into a few ms each. A float32 filter mirror-symmetric in both axes (ESC's
    symmetrised one) has a real spectrum about its centre that factors into a row and a column
    part (``_factored_spectrum``): where the CPU kernels are available only the factors are kept
    (1.4 MB instead of ESC's 66 MB complex spectrum at 180x320) and their ``spectral_mix`` mixes the
    channels building the spectrum on the fly (the centring becomes a shifted crop).
    """

    max_spectra = 4  # sizes kept (a tiled image has up to 4 tile sizes) ...
    max_spectra_bytes = 512 << 20  # ... within this much memory; the newest is always kept

    def __init__(self, weight: torch.Tensor, depthwise: bool = False):
        self.weight = weight
        self.depthwise = depthwise
        self._spectra = {}
        self._factors_apply = None  # checked once, like the spectra: the filter is fixed while kept

    def use_fft(self, x: torch.Tensor) -> bool:
        return use_fft(x, self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fft(x):
            return self.fft_conv(x)
        return F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2,
                        groups=self.weight.shape[0] if self.depthwise else 1)

    def _factorable(self) -> bool:
        """Mirror-symmetric in both axes (to float32 rounding), with an odd size of 3 to 15 taps
        (what ``spectral_mix`` takes)."""
        if self.depthwise:
            return False
        if self._factors_apply is None:
            weight, k = self.weight.detach(), self.weight.shape[-1]
            tolerance = 1e-6 * weight.abs().max()
            self._factors_apply = bool(k % 2 == 1 and 3 <= k <= 15
                                       and (weight.flip(-1) - weight).abs().max() <= tolerance
                                       and (weight.flip(-2) - weight).abs().max() <= tolerance)
        return self._factors_apply

    def _spectrum(self, size, dtype, factored: bool):
        """(in, out, h, w // 2 + 1) complex spectrum ((C, h, w // 2 + 1) if depthwise), or the factors
        of the real one about the centre."""
        if self.depthwise:
            return _kernel_spectrum(self.weight.to(dtype)[:, 0], size)
        weight = self.weight.to(dtype).transpose(0, 1)
        return _factored_spectrum(weight, size) if factored else _kernel_spectrum(weight, size)

    def fft_size(self, x: torch.Tensor) -> tuple:
        """The (height, width) ``fft_conv`` transforms x at."""
        return _fft_plan(x, self.weight.shape[-1])[0]

    def fft_conv(self, x: torch.Tensor, padded: torch.Tensor | None = None) -> torch.Tensor:
        """``padded``: x zero-padded to ``fft_size(x)`` (x the top-left corner), if the caller has it."""
        size, crop = _fft_plan(x, self.weight.shape[-1])
        op = spectral_mix_op() if x.dtype == torch.float32 else None
        factored = op is not None and self._factorable()
        key = (size, x.dtype, factored)
        # one deployed model may serve several threads: every step below is one dict operation
        # (atomic under the GIL), no iteration over the dict while another thread changes it
        kernel = self._spectra.pop(key, None)  # re-inserted last: least recently used go first
        if kernel is None:
            kernel = self._spectrum(size, x.dtype, factored)
        self._spectra[key] = kernel
        while len(self._spectra) > 1 and (len(self._spectra) > self.max_spectra or sum(
                _nbytes(t) for t in list(self._spectra.values())) > self.max_spectra_bytes):
            oldest = next(iter(list(self._spectra)), None)
            if oldest is None or oldest == key:
                break
            self._spectra.pop(oldest, None)
        signal = torch.fft.rfft2(x, s=size) if padded is None else torch.fft.rfft2(padded)  # (B, in, h, w)
        if factored:
            rows, cols = kernel
            spectrum = signal.new_empty(signal.shape[0], rows.shape[2], *signal.shape[2:])
            op(torch.view_as_real(signal), rows, cols, torch.view_as_real(spectrum))
            return torch.fft.irfft2(spectrum, s=size)[..., :x.shape[-2], :x.shape[-1]]  # centred: no shift
        if self.depthwise:
            return torch.fft.irfft2(signal.mul_(kernel), s=size)[crop]
        # sum over input channels as broadcast multiply-adds: a batched matmul would first
        # copy the (large) kernel spectrum into matmul layout on every call
        spectrum = signal[:, :1] * kernel[0]
        for i in range(1, kernel.shape[0]):
            spectrum.addcmul_(signal[:, i:i + 1], kernel[i])
        return torch.fft.irfft2(spectrum, s=size)[crop]


def _nbytes(spectrum) -> int:
    """Memory of a kept spectrum: a tensor or a tuple of them."""
    tensors = spectrum if isinstance(spectrum, tuple) else (spectrum, )
    return sum(t.numel() * t.element_size() for t in tensors)


def dynamic_kernel_head(pdim: int, reduction: int, kernel_size: int = 3) -> nn.Sequential:
    """Pool -> 1x1 (pdim -> pdim//reduction) -> GELU -> 1x1 (-> pdim*k*k): a k x k kernel per
    sample and channel. Indices 1 and 3 hold the weights (the authors' state-dict names)."""
    if pdim // reduction < 1:
        raise ValueError(f'pdim ({pdim}) must be at least {reduction}: the dynamic kernel head has pdim // '
                         f'{reduction} channels')
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(pdim, pdim // reduction, 1),
        nn.GELU(),
        nn.Conv2d(pdim // reduction, pdim * kernel_size * kernel_size, 1),
    )


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm over C (eps 1e-6), parameters ``weight`` and ``bias``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize_last_dim(x.permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2) if is_channels_last(x) else to_channels_first(out)

    def normalize_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation on a (..., C) tensor (at CPU float32 inference on a contiguous
        one through the CPU kernel: ESC's 180x320 map 1.34 -> 0.61 ms)."""
        fast = cpu_float32_inference(x) and self.weight.dtype == torch.float32 and x.is_contiguous()
        op = layer_norm_op() if fast else None
        if op is not None:
            out = torch.empty_like(x)
            op(x, self.weight, self.bias, self.eps, out)
            return out
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class ConvFFN(nn.Module):
    """1x1 expand -> GELU -> depthwise kxk -> GELU (+ its input) -> 1x1 project.

    CPU float32 inference on a channels-last input (see ``inference_layout``) with k = 3 runs the
    fused kernel (esc_arch/kernels, ``conv_ffn``; the same values, its hidden maps in cache). ESC's
    ConvFFN at 180x320, 2 threads, Xeon with AVX-512, PyTorch's allocator tuned: PyTorch 8.0-8.7 ms,
    AVX-512 kernel 5.85-6.07 ms. With PyTorch and oneDNN held to AVX2 (``ATEN_CPU_CAPABILITY=avx2
    ONEDNN_MAX_CPU_ISA=AVX2``, as on an AVX2-only CPU) and the AVX2 build: PyTorch 14.1 ms, kernel
    10.4 ms (hidden 80); 22.3-23.4 vs 16.9-17.2 ms (the blocks' ``proj``, hidden 128).
    """

    def __init__(self, dim: int, kernel_size: int, exp_ratio: float):
        super().__init__()
        width = dim * exp_ratio
        hidden = int(width) if math.isfinite(width) else 0
        if hidden < 1:
            raise ValueError(f'exp_ratio {exp_ratio!r} gives int(dim * exp_ratio) = {hidden} hidden channels of the '
                             f'ConvFFN (dim {dim}); it needs at least 1')
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.aggr = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_applies(x):
            return self._fused(x)
        x = gelu(self.proj(x), inplace=True)
        return self.aggr(accumulate(gelu(self.dwc(x), inplace=True), x))

    def _fused_applies(self, x: torch.Tensor) -> bool:
        return (cpu_float32_inference(x) and is_channels_last(x) and self.dwc.kernel_size == (3, 3)
                and self.aggr.out_channels % 8 == 0 and all(map(_weight_fits, (self.proj, self.dwc, self.aggr)))
                and conv_ffn_op() is not None)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        hidden, dim = self.proj.out_channels, self.aggr.out_channels
        out = x.new_empty(b, h, w, dim)
        conv_ffn_op()(x.permute(0, 2, 3, 1), self.proj.weight.view(hidden, -1), self.proj.bias,
                      self.dwc.weight.view(hidden, 9), self.dwc.bias, self.aggr.weight.view(dim, hidden),
                      self.aggr.bias, out)
        return out.permute(0, 3, 1, 2)  # channels-last, as the input


# --------------------------------------------------------------------------------------
# convolutional attention
# --------------------------------------------------------------------------------------
class LargeKernelAttention(nn.Module):
    """What ESC's and ESC-FP's convolutional attentions share: at CPU float32 inference on
    channels-last maps (with the CPU kernels) ``forward_in_place`` writes the result over the
    input's first ``pdim`` channels."""

    def in_place_applies(self, x: torch.Tensor, *filters) -> bool:
        return cpu_float32_inference(x) and is_channels_last(x) and conv_attn_merge_op() is not None


def _planes_and_large(pixels: torch.Tensor, lk: LargeKernel, x: torch.Tensor) -> tuple:
    """The (B, P, H, W) planes of ``pixels`` (B, H, W, P) and their convolution with ``lk`` (x: the
    image they belong to). Through the FFT the planes are the top-left corner of its zero-padded
    buffer, which the CPU kernels fill in one pass."""
    b, h, w, planes = pixels.shape
    if lk.use_fft(x):
        padded = pixels.new_empty(b, planes, *lk.fft_size(x))
        pad_planes_op()(pixels, padded)
        y = padded[..., :h, :w]
        return y, lk.fft_conv(y, padded=padded)
    y = to_channels_first(pixels)
    return y, lk(y)


class ConvolutionalAttention(LargeKernelAttention):
    """ESC's large-kernel attention on the first ``pdim`` channels.

    x1 -> conv(x1, shared dense K x K filter) + depthwise 3x3 with a kernel predicted from
    each sample's own x1 (``dwc_proj``, zero-initialised so training starts from the static
    filter).
    """

    def __init__(self, pdim: int):
        super().__init__()
        self.pdim = pdim
        self.dwc_proj = dynamic_kernel_head(pdim, 2)
        nn.init.zeros_(self.dwc_proj[-1].weight)
        nn.init.zeros_(self.dwc_proj[-1].bias)

    def forward(self, x1: torch.Tensor, lk_filter: LargeKernel | torch.Tensor) -> torch.Tensor:
        if isinstance(lk_filter, torch.Tensor):
            lk_filter = LargeKernel(lk_filter)
        dynamic = self.dwc_proj(x1).reshape(-1, 1, 3, 3)
        return lk_filter(x1) + per_sample_depthwise(x1, dynamic)

    def forward_in_place(self, x: torch.Tensor, lk_filter: LargeKernel | torch.Tensor) -> None:
        """``forward`` of x's first ``pdim`` channels, written over them (x channels-last, see
        ``in_place_applies``). The CPU kernels move the channels into the FFT's zero-padded
        planes in one pass, and add the dynamic 3x3 while writing the result back."""
        if isinstance(lk_filter, torch.Tensor):
            lk_filter = LargeKernel(lk_filter)
        pixels = x.permute(0, 2, 3, 1)[..., :self.pdim]  # (B, H, W, pdim) view
        x1, large = _planes_and_large(pixels, lk_filter, x)
        dynamic = self.dwc_proj(x1).reshape(x.shape[0], self.pdim, 9).contiguous()
        conv_attn_merge_op()(large, x1, dynamic, pixels)


class DecomposedConvolutionalAttention(LargeKernelAttention):
    """ESC-FP's attention: shared 1x1 ``lk_channel``, then a per-sample depthwise K x K conv
    whose kernel is the shared ``lk_spatial`` plus the dynamic 3x3 kernel (zero-padded)."""

    def __init__(self, pdim: int):
        super().__init__()
        self.pdim = pdim
        self.proj = dynamic_kernel_head(pdim, 4)

    def forward(self, x1: torch.Tensor, lk_channel: torch.Tensor,
                lk_spatial: LargeKernel | torch.Tensor) -> torch.Tensor:
        spatial = lk_spatial.weight if isinstance(lk_spatial, LargeKernel) else lk_spatial
        b = x1.shape[0]
        k = spatial.shape[-1]
        dynamic = F.pad(self.proj(x1).reshape(b, self.pdim, 3, 3), [(k - 3) // 2] * 4)
        kernel = (dynamic + spatial.view(1, self.pdim, k, k)).reshape(b * self.pdim, 1, k, k)
        return per_sample_depthwise(F.conv2d(x1, lk_channel), kernel)

    def in_place_applies(self, x: torch.Tensor, lk_channel: torch.Tensor = None,
                         lk_spatial: LargeKernel | torch.Tensor = None) -> bool:
        # a shared kernel smaller than 3x3 crops the dynamic 3x3 to its centre (``forward``), where
        # the CPU kernels add all of it
        spatial = lk_spatial.weight if isinstance(lk_spatial, LargeKernel) else lk_spatial
        return (spatial is None or spatial.shape[-1] >= 3) and super().in_place_applies(x)

    def forward_in_place(self, x: torch.Tensor, lk_channel: torch.Tensor,
                         lk_spatial: LargeKernel | torch.Tensor) -> None:
        """``forward`` of x's first ``pdim`` channels, written over them (x channels-last, see
        ``in_place_applies``). The depthwise conv splits into the shared ``lk_spatial``
        (through the FFT with its spectrum kept, as ESC's filter) plus the dynamic 3x3, which
        the CPU kernels add while writing the result back (the ConvAttn-in-place path of ESC)."""
        if isinstance(lk_spatial, torch.Tensor):
            lk_spatial = LargeKernel(lk_spatial, depthwise=True)
        b, _, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1)[..., :self.pdim]  # (B, H, W, pdim) view
        # the head's average pool as a matrix-vector product over the strided pixels (0.36 -> 0.08 ms
        # at 180x320 with 48 channels); a pool of the 1x1 result is the identity
        means = torch.matmul(pixels.new_full((1, h * w), 1.0 / (h * w)), pixels.reshape(b, h * w, self.pdim))
        dynamic = self.proj(means.view(b, self.pdim, 1, 1)).reshape(b, self.pdim, 9).contiguous()
        mixed = torch.matmul(pixels, lk_channel.view(self.pdim, self.pdim).t())  # lk_channel: (B, H, W, pdim)
        y, large = _planes_and_large(mixed, lk_spatial, x)
        conv_attn_merge_op()(large, y, dynamic, pixels)


class PartialConvAttn(nn.Module):
    """Apply ``plk`` to the first ``pdim`` channels, pass the rest through, then 1x1 ``aggr``."""

    def __init__(self, dim: int, pdim: int, plk: nn.Module):
        super().__init__()
        self.pdim = pdim
        self.plk = plk
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, *filters, overwrite_input: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``overwrite_input``: x is a temporary of the caller's, so at inference the result
        of ``plk`` is written into it instead of allocating a concatenation. ``residual``: returns
        residual + the output instead (see ``conv_accumulate``; a temporary of the caller's)."""
        in_place = overwrite_input and isinstance(self.plk, LargeKernelAttention)
        if in_place and self.plk.in_place_applies(x, *filters):
            self.plk.forward_in_place(x, *filters)
            return conv_accumulate(residual, self.aggr, x)
        x1 = x[:, :self.pdim]
        if is_channels_last(x):  # the FFT wants planes; a chunked transpose is ~2x faster than contiguous()
            x1 = to_channels_first(x1.permute(0, 2, 3, 1))
        x1 = self.plk(x1, *filters)
        if overwrite_input and not (torch.is_grad_enabled() and x.requires_grad):
            x[:, :self.pdim] = x1
            return conv_accumulate(residual, self.aggr, x)
        return conv_accumulate(residual, self.aggr, torch.cat([x1, x[:, self.pdim:]], dim=1))


# --------------------------------------------------------------------------------------
# window attention
# --------------------------------------------------------------------------------------
def relative_position_bias(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Dense (heads, N, N) bias, N = w*w, from the (heads, (2w-1)^2) table.

    B[h, q, k] = table[h, (kh-qh+w-1)*(2w-1) + (kw-qw+w-1)]: key minus query, the transpose
    of Swin's convention (the released checkpoints were trained with it).
    """
    w = window_size
    heads = table.shape[0]
    offsets = torch.arange(w, device=table.device)
    rel = offsets[None, :] - offsets[:, None] + w - 1  # [query, key]
    grid = table.view(heads, 2 * w - 1, 2 * w - 1)
    bias = grid[:, rel[:, None, :, None], rel[None, :, None, :]]  # (heads, qh, qw, kh, kw)
    return bias.reshape(heads, w * w, w * w)


def _rpe_score_mod(table: torch.Tensor, window_size: int) -> Callable:
    w = window_size

    def score_mod(score, b, h, q_idx, kv_idx):
        rel_h = kv_idx // w - q_idx // w + w - 1
        rel_w = kv_idx % w - q_idx % w + w - 1
        return score + table[h, rel_h * (2 * w - 1) + rel_w]

    return score_mod


def _dense_score_mod(bias: torch.Tensor) -> Callable:
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    return score_mod


_compiled_flex = None


def _flex_attention(q, k, v, score_mod):
    """flex_attention with the bias as a score_mod: compiled on CUDA, eager elsewhere (exact,
    no 30 s CPU compile)."""
    global _compiled_flex
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex(q, k, v, score_mod=score_mod)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return flex_attention(q, k, v, score_mod=score_mod)


def resolve_attn_type(attn_type: str) -> str:
    """Map the user's value (any case) to a backend; ``auto`` (and ``flashbias``, which also
    chooses the bias's layout, see ``WindowAttention``) gives SDPA with the bias as a float mask,
    and ``WindowAttention`` turns that into the fused kernel (esc_arch/kernels) for CPU float32
    inference where it applies (flex on CUDA is not measured yet)."""
    name = attn_type.lower() if isinstance(attn_type, str) else attn_type
    if name not in ATTN_TYPES + (FLASHBIAS, ):
        raise ValueError(f"attn_type must be one of {', '.join(ATTN_TYPES)} or FlashBias (any case), got {attn_type!r}")
    if name in ('auto', FLASHBIAS):
        return 'sdpa'
    return name


def is_flashbias(attn_type) -> bool:
    return isinstance(attn_type, str) and attn_type.lower() == FLASHBIAS


def windowed_attention(q, k, v, table, window_size, backend, bias=None):
    """softmax(q k^T / sqrt(c) + B) v over windows; q/k/v: (windows, heads, N, c). Flex builds
    B from ``table`` where one is given; otherwise (and for naive and SDPA) B is the dense
    ``bias`` (heads, Nq, Nk)."""
    if backend == 'flex':
        return _flex_attention(q, k, v, _rpe_score_mod(table.to(q.dtype), window_size) if table is not None
                               else _dense_score_mod(bias.to(q.dtype)))
    bias = bias.to(q.dtype).unsqueeze(0)
    if backend == 'sdpa':
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    score = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + bias
    return score.softmax(dim=-1) @ v


def flashbias_factors(table: torch.Tensor, window_size: int, rank: int) -> tuple:
    """The authors' start for a FlashBias model from a table-layout one: the dense bias of
    ``table`` (heads, (2w-1)^2) split by a truncated SVD, B ~ (U sqrt(S)) (V sqrt(S))^T, each
    factor (heads, w*w, rank) (zero columns past the bias's own rank), computed in float64 and
    returned in the table's dtype, with the relative (Frobenius) error of the approximation."""
    bias = relative_position_bias(table.detach().double(), window_size)
    u, sv, vh = torch.linalg.svd(bias, full_matrices=False)
    kept = min(rank, sv.shape[-1])
    root = sv[:, None, :kept].sqrt()
    q_f, k_f = (bias.new_zeros(*bias.shape[:2], rank) for _ in range(2))
    q_f[..., :kept] = u[..., :kept] * root
    k_f[..., :kept] = vh[:, :kept].transpose(-2, -1) * root
    error = (torch.linalg.matrix_norm(bias - q_f @ k_f.transpose(-2, -1)).norm()
             / torch.linalg.matrix_norm(bias).norm().clamp_min(1e-300)).item()
    return q_f.to(table.dtype), k_f.to(table.dtype), error


class WindowAttention(nn.Module):
    """Non-overlapping window self-attention with a relative position bias.

    Args:
        dim: channels. window_size: side of the square window. num_heads: heads.
        attn_type: 'auto' (default), 'naive', 'sdpa' or 'flex' (any case); all exact. 'auto' is
            SDPA, except for CPU float32 inference where the fused kernel applies (head dim
            8/16/24/32, window size a multiple of 8): ~2.5x faster than SDPA there (ESC's
            layer at 180x320 on a 2-core AVX2 EPYC: 119-121 ms against 301 ms), with no dense bias.
            'FlashBias' (the authors' ESC_FB variants): the bias is not a relative-position table
            but the product of two learnt factors, ``flashbias_q @ flashbias_k^T`` (each (heads,
            w*w, flashbias_rank)), computed exactly as 'auto' does with a dense bias (the authors run
            it through bf16 flash attention). ``set_attn_type`` may still switch its backend.
        flashbias_rank: the factors' rank, with attn_type FlashBias only (default, as the
            authors': 256 - dim / num_heads). A table-layout state dict (``relative_position_bias``)
            loads into a FlashBias layer by a truncated SVD of its bias, as the authors' fine-tuning
            starts (one log line with the approximation's error).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, attn_type: str = 'auto',
                 flashbias_rank: int | None = None):
        super().__init__()
        for name, value in (('dim', dim), ('window_size', window_size), ('num_heads', num_heads)):
            check_whole(name, value)
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        resolve_attn_type(attn_type)  # validate early
        self.flashbias = is_flashbias(attn_type)
        if flashbias_rank is not None and not self.flashbias:
            raise ValueError(f'flashbias_rank ({flashbias_rank}) is for attn_type FlashBias only, got attn_type '
                             f'{attn_type!r} (whose bias is a relative-position table)')
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.attn_type = attn_type
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if self.flashbias:
            if flashbias_rank is None and dim // num_heads >= 256:
                raise ValueError(f'flashbias_rank must be given: its default, 256 - head dim ({dim // num_heads}), '
                                 'is below 1')
            rank = 256 - dim // num_heads if flashbias_rank is None else flashbias_rank
            check_whole('flashbias_rank', rank)
            self.flashbias_rank = rank
            # the authors start both at zero, where neither ever gets a gradient (they always load
            # a table-layout model first); small random factors train from scratch too, their
            # product of the table's scale (std 0.001)
            std = (1e-3 / math.sqrt(rank)) ** 0.5
            n = window_size * window_size
            self.flashbias_q = nn.Parameter(torch.randn(num_heads, n, rank) * std)
            self.flashbias_k = nn.Parameter(torch.randn(num_heads, n, rank) * std)
            self.register_load_state_dict_pre_hook(_factor_table_hook)
        else:
            self.relative_position_bias = nn.Parameter(torch.randn(num_heads, (2 * window_size - 1)**2) * 0.001)
        self._deployed = False
        self._drop_bias()  # the dense bias kept outside autograd, and a copy of what it came from
        self.last_backend = None  # what the latest forward ran ('fused', 'sdpa', ...): for benchmarks

    # un-deployed (e.g. BasicSR validating its EMA model) keeps biases up to this size between
    # forwards (ESC: 16 MB per layer); larger ones (ESC-XL: 255 MB) only once deployed
    max_kept_bias_bytes = 64 << 20

    def bias_parameters(self) -> tuple:
        """What the bias is made of: the relative-position table, or FlashBias's two factors."""
        return (self.flashbias_q, self.flashbias_k) if self.flashbias else (self.relative_position_bias, )

    def _build_bias(self, *params: torch.Tensor) -> torch.Tensor:
        if self.flashbias:
            return params[0] @ params[1].transpose(-2, -1)
        return relative_position_bias(params[0], self.window_size)

    def dense_bias(self) -> torch.Tensor:
        """The (heads, N, N) bias. Outside autograd it is kept until its parameters change (updated
        in place, reloaded, moved), so evaluation does not rebuild it on every forward."""
        params = self.bias_parameters()
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or tracing():
            return self._build_bias(*params)  # a trace records it, not a constant
        # kept while the parameters hold the same values (the table is small: 4 x 63 x 63 floats
        # against a 16 MB bias). On a GPU, where a comparison would wait for the device, an
        # undeployed layer rebuilds it (one kernel) and a deployed one keeps it while they are the
        # same tensors
        on_cpu = params[0].device.type == 'cpu'
        cache = self._bias_cache  # read once: threads may replace it meanwhile (one attribute, never half-written)
        if cache is not None:
            bias, sources, kept_params = cache
            # one built under inference_mode cannot be saved for a backward (a frozen model's input
            # that requires grad): built anew then, outside it
            if (all(unchanged(kept, p) for kept, p in zip(sources, params))
                    and (on_cpu or all(kept is p for kept, p in zip(kept_params, params)))
                    and not (torch.is_grad_enabled() and bias.is_inference())):
                return bias
        bias = self._build_bias(*(p.detach() for p in params))
        if self._deployed or (on_cpu and bias.numel() * bias.element_size() <= self.max_kept_bias_bytes):
            # the bias, copies of what it came from, and those parameters (a tuple: not registered)
            self._bias_cache = (bias, tuple(p.detach().clone() for p in params), params)
        return bias

    def deploy(self):
        """Allow keeping a dense bias of any size (built by the first forward that reads it; the
        fused CPU kernel reads a table model's table and never builds its bias)."""
        self._deployed = True

    def undeploy(self):
        self._deployed = False
        self._drop_bias()

    def _drop_bias(self):
        self._bias_cache = None

    @property
    def kept_bias(self) -> torch.Tensor | None:
        """The dense bias kept between forwards, if any."""
        cache = self._bias_cache
        return None if cache is None else cache[0]

    def train(self, mode: bool = True):
        if mode:
            self.undeploy()  # training rebuilds the bias in the graph: free the cached one
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # a move or cast may keep the table's identity and version
        self._drop_bias()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor, norm: LayerNorm2d | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, dim, H, W). ``norm``: a LayerNorm2d applied to x first (per pixel, so it is
        applied to the windows, where the channels are contiguous). ``residual``: returns
        residual + the attention instead (see ``conv_accumulate``; a temporary of the caller's)."""
        b, _, h, w = x.shape
        ws, heads, c = self.window_size, self.num_heads, self.dim // self.num_heads
        backend = resolve_attn_type(self.attn_type)
        if (backend == 'flex' and x.device.type != 'cuda' and torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            backend = 'sdpa'  # flex_attention has no backward on the CPU; SDPA computes the same
        if (backend == 'sdpa' and self.attn_type.lower() in ('auto', FLASHBIAS) and cpu_float32_inference(x)
                and fused_attention_applies(c, ws)):
            backend = 'fused'  # the CPU inference kernel (esc_arch/kernels): same values, no dense bias but FlashBias's
        self.last_backend = backend
        channels_last = is_channels_last(x)
        if backend == 'fused':
            return self._fused(x, norm, channels_last, residual)
        x = reflect_pad_to_multiple(x, ws)
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        # one gather into (windows, ws*ws, dim): everything up to the output projection is per
        # pixel or per window
        x = x.permute(0, 2, 3, 1).contiguous().view(b, nh, ws, nw, ws, self.dim)
        x = x.transpose(2, 3).reshape(b * nh * nw, ws * ws, self.dim)
        if norm is not None:
            x = norm.normalize_last_dim(x)
        qkv = linear(x, self.to_qkv.weight.view(3 * self.dim, self.dim), self.to_qkv.bias)
        q, k, v = qkv.view(b * nh * nw, ws * ws, 3, heads, c).permute(2, 0, 3, 1, 4)
        if backend == 'flex' or tracing():  # whole windows (flex's score_mod indexes all queries)
            table = None if self.flashbias else self.relative_position_bias
            bias = None if backend == 'flex' and table is not None else self.dense_bias()  # flex reads the table
            out = windowed_attention(q, k, v, table, ws, backend, bias=bias)
            out = out.transpose(1, 2).reshape(b * nh * nw, ws * ws, self.dim)
        else:
            out = self._attend_inside(q, k, v, backend, b, h, w).view(b * nh * nw, ws * ws, self.dim)
        out = linear(out, self.to_out.weight.view(self.dim, self.dim), self.to_out.bias)
        out = out.view(b, nh, nw, ws, ws, self.dim).transpose(2, 3).reshape(b, hp, wp, self.dim)
        out = out.permute(0, 3, 1, 2) if channels_last else to_channels_first(out)  # the input's layout
        out = out[:, :, :h, :w]
        return out if residual is None else accumulate(residual, out)

    def _fused(self, x: torch.Tensor, norm: LayerNorm2d | None, channels_last: bool,
               residual: torch.Tensor | None) -> torch.Tensor:
        """The fused CPU kernel, in image layout: the kernel reads the padded windows' keys where
        the reflection maps them, so no padded copy, window gather or scatter is made. The 1x1
        projections run as convolutions on channels-last maps (``conv_plus`` / ``conv_accumulate``:
        oneDNN's, or the kernels' ``conv1x1`` in the AVX2 build; Xeon, oneDNN, ESC at 180x320: 4.5 and
        1.7 ms against 5.8 and 2.4 ms as matrix products)."""
        b, _, h, w = x.shape
        ws, heads, c = self.window_size, self.num_heads, self.dim // self.num_heads
        pixels = x.permute(0, 2, 3, 1)
        if norm is not None:
            pixels = norm.normalize_last_dim(pixels)
        qkv = conv_plus(self.to_qkv, pixels.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        q, k, v = qkv.permute(0, 2, 3, 1).contiguous().view(b, h, w, 3, heads, c).unbind(3)
        out = qkv.new_empty(b, h, w, heads, c)
        table = (self.dense_bias().contiguous() if self.flashbias  # its bias is no table: the kernel reads it dense
                 else self.relative_position_bias.detach().view(heads, 2 * ws - 1, 2 * ws - 1))
        rows, cols = (padded_positions(n, ws) for n in (h, w))
        window_attention_op()(q, k, v, table, rows, cols, ws, c**-0.5, out)
        out = out.view(b, h, w, self.dim).permute(0, 3, 1, 2)
        if not channels_last:
            out = self.to_out(out).contiguous()
            return out if residual is None else accumulate(residual, out)
        return conv_accumulate(residual, self.to_out, out)

    def _attend_inside(self, q, k, v, backend, b, h, w):
        """Attention for the queries inside the unpadded H x W only (keys: whole windows).

        Windows that hang over the padded bottom/right edge compute just their queries inside
        the image; the rest of the output stays zero and is cropped away. Returns
        (B, nh, nw, N, heads, c): the token-major layout the output projection reads.
        """
        ws, heads, c = self.window_size, self.num_heads, self.dim // self.num_heads
        nh, nw, n = -(-h // ws), -(-w // ws), ws * ws
        bias = self.dense_bias()
        q, k, v = (t.view(b, nh, nw, heads, n, c) for t in (q, k, v))
        out = q.new_empty(b, nh, nw, n, heads, c)
        for rows, q_rows in _window_groups(nh, ws, h):
            for cols, q_cols in _window_groups(nw, ws, w):
                if q_cols == ws:  # whole rows of the window: a prefix of its tokens
                    tokens, rest = slice(0, q_rows * ws), slice(q_rows * ws, n)
                else:
                    tokens = (torch.arange(q_rows, device=q.device)[:, None] * ws
                              + torch.arange(q_cols, device=q.device)).flatten()
                    rest = torch.ones(n, dtype=torch.bool, device=q.device).index_fill_(0, tokens, False)
                if q_rows * q_cols < n:  # queries in the padding: zeros (cropped away later)
                    out[:, rows, cols, rest] = 0
                q_g, k_g, v_g = q[:, rows, cols][..., tokens, :], k[:, rows, cols], v[:, rows, cols]
                n_q = q_rows * q_cols
                o = windowed_attention(q_g.reshape(-1, heads, n_q, c), k_g.reshape(-1, heads, n, c),
                                       v_g.reshape(-1, heads, n, c), None, ws, backend, bias=bias[:, tokens])
                out[:, rows, cols, tokens] = o.view(q_g.shape).transpose(3, 4)
        return out

    def extra_repr(self):
        rank = f', flashbias_rank={self.flashbias_rank}' if self.flashbias else ''
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'attn_type={self.attn_type}{rank}')


def flashbias_table_shape(layer: WindowAttention) -> tuple:
    """The shape of the table a FlashBias layer's bias can be factored from."""
    return (layer.num_heads, (2 * layer.window_size - 1)**2)


def _factor_table_hook(layer: WindowAttention, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs):
    """A table-layout state dict into a FlashBias layer: its bias's truncated SVD (``flashbias_factors``)."""
    table = state_dict.get(prefix + 'relative_position_bias')
    if table is None or prefix + 'flashbias_q' in state_dict or prefix + 'flashbias_k' in state_dict:
        return
    if tuple(table.shape) != flashbias_table_shape(layer):
        error_msgs.append(f'size mismatch for {prefix}relative_position_bias: copying a table of shape '
                          f'{tuple(table.shape)}, this FlashBias layer (window {layer.window_size}, '
                          f'{layer.num_heads} heads) factors one of shape {flashbias_table_shape(layer)}')
        return
    q_f, k_f, error = flashbias_factors(table, layer.window_size, layer.flashbias_rank)
    del state_dict[prefix + 'relative_position_bias']
    state_dict[prefix + 'flashbias_q'], state_dict[prefix + 'flashbias_k'] = q_f, k_f
    logging.getLogger('basicsr').info(
        f'Decomposed {prefix}relative_position_bias into rank-{layer.flashbias_rank} FlashBias factors '
        f'(relative error {error:.2e}).')


def _window_groups(n: int, ws: int, size: int) -> list:
    """Along one axis of n windows covering ``size`` pixels: (window slice, query rows needed)."""
    last = size - (n - 1) * ws
    if last == ws:
        return [(slice(0, n), ws)]
    return ([(slice(0, n - 1), ws)] if n > 1 else []) + [(slice(n - 1, n), last)]


# --------------------------------------------------------------------------------------
# block and trunk
# --------------------------------------------------------------------------------------
class ESCBlock(nn.Module):
    """LN -> ConvFFN -> (+ window attention) -> conv_blocks x (+ ConvAttn(ConvFFN(LN))) ->
    LN -> 3x3, plus the block's input.

    ``make_plk(pdim)`` builds the convolutional attention (ESC's or ESC-FP's); the shared
    large-kernel filters are passed to ``forward``.
    """

    def __init__(self, dim: int, pdim: int, conv_blocks: int, window_size: int, num_heads: int,
                 exp_ratio: float, proj_ratio: float, use_ln: bool, make_plk: Callable[[int], nn.Module],
                 attn_type: str = 'auto', flashbias_rank: int | None = None):
        super().__init__()
        self.ln_proj = LayerNorm2d(dim)
        self.proj = ConvFFN(dim, 3, proj_ratio)
        self.ln_attn = LayerNorm2d(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_type, flashbias_rank)
        if use_ln:
            self.lns = nn.ModuleList([LayerNorm2d(dim) for _ in range(conv_blocks)])
        else:
            self.lns = [nn.Identity() for _ in range(conv_blocks)]  # no state-dict keys
        self.pconvs = nn.ModuleList([PartialConvAttn(dim, pdim, make_plk(pdim)) for _ in range(conv_blocks)])
        self.convffns = nn.ModuleList([ConvFFN(dim, 3, exp_ratio) for _ in range(conv_blocks)])
        self.ln_out = LayerNorm2d(dim)
        self.conv_out = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, *filters: torch.Tensor) -> torch.Tensor:
        skip = x
        x = self.proj(self.ln_proj(x))
        x = self.attn(x, norm=self.ln_attn, residual=x)
        for ln, pconv, convffn in zip(self.lns, self.pconvs, self.convffns):
            x = pconv(convffn(ln(x)), *filters, overwrite_input=True, residual=x)
        return conv_plus(self.conv_out, self.ln_out(x), skip)


class ESCTrunk(nn.Module):
    """What ESC, ESC-FP and ESC-Real share: ``proj`` (3x3, 3 -> dim), ``blocks``, ``last``.

    Subclasses provide ``large_kernel_filters()`` (the filters every block shares) and the
    reconstruction head; ``features(x)`` returns ``last(ln_last(blocks(proj(x)))) + proj(x)``
    (channels-last at CPU inference, see ``inference_layout``; heads return plain NCHW).
    """

    def __init__(self, dim: int, pdim: int, n_blocks: int, conv_blocks: int, window_size: int,
                 num_heads: int, exp_ratio: float, proj_ratio: float, use_ln: bool,
                 make_plk: Callable[[int], nn.Module], attn_type: str, ln_last: bool, deployment: bool = False,
                 flashbias_rank: int | None = None):
        super().__init__()
        self.deployment = deployment  # deploy() automatically on the first inference forward
        self.deployed = False
        self._kept_kernel = None  # a deployed model's LargeKernel: its FFT spectra kept across images
        self._kept_source = None  # a copy of the filter it was made from
        self.register_load_state_dict_post_hook(_undeploy_after_load)
        for name, value, minimum in (('dim', dim, 1), ('pdim', pdim, 1), ('n_blocks', n_blocks, 0),
                                     ('conv_blocks', conv_blocks, 0), ('window_size', window_size, 1),
                                     ('num_heads', num_heads, 1)):
            check_whole(name, value, minimum)
        if not 0 < pdim <= dim:
            raise ValueError(f'pdim ({pdim}) must be in 1..dim ({dim})')
        self.dim, self.pdim, self.window_size = dim, pdim, window_size
        self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = nn.ModuleList([
            ESCBlock(dim, pdim, conv_blocks, window_size, num_heads, exp_ratio, proj_ratio, use_ln, make_plk,
                     attn_type, flashbias_rank) for _ in range(n_blocks)
        ])
        if ln_last:
            self.ln_last = LayerNorm2d(dim)
        self.last = nn.Conv2d(dim, dim, 3, padding=1)

    def large_kernel_filters(self) -> tuple:
        raise NotImplementedError

    def _large_kernel(self, weight: torch.Tensor, depthwise: bool = False) -> LargeKernel:
        """``LargeKernel(weight)``; a deployed model keeps one, with its spectra, while ``weight``
        is ``unchanged`` (the filter is small next to its spectra)."""
        if not self.deployed or tracing() or (torch.is_grad_enabled() and weight.requires_grad):
            return LargeKernel(weight, depthwise)  # a trace or a graph records the kernel's making
        if self._kept_kernel is None or not unchanged(self._kept_source, weight):
            self._kept_kernel, self._kept_source = LargeKernel(weight, depthwise), weight.detach().clone()
        return self._kept_kernel

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            raise ValueError(f'{type(self).__name__} takes a (N >= 1, 3, H, W) batch of RGB images, '
                             f'got shape {tuple(x.shape)}')
        # not while tracing: a trace or an exported graph would record the fold's writes into plk_filter
        if self.deployment and not self.training and not self.deployed and not tracing():
            with _DEPLOY_LOCK:  # threads racing a first forward: one deploys (twice would fold the folded filter)
                if not self.deployed:
                    self.deploy()
        feat = self.proj(inference_layout(x))
        skip = feat
        filters = self.large_kernel_filters()
        for block in self.blocks:
            feat = block(feat, *filters)
        if hasattr(self, 'ln_last'):
            feat = self.ln_last(feat)
        return conv_plus(self.last, feat, skip)

    def set_attn_type(self, attn_type: str):
        """Switch every window attention to another backend (e.g. 'flex' on CUDA). A FlashBias
        model keeps its factored bias whatever the backend."""
        resolve_attn_type(attn_type)
        layers = [module for module in self.modules() if isinstance(module, WindowAttention)]
        if is_flashbias(attn_type) and not all(layer.flashbias for layer in layers):
            raise ValueError(f'{type(self).__name__}: FlashBias is a weight layout of its own (flashbias_q/k in place '
                             'of relative_position_bias), not a backend to switch to: build the model with attn_type '
                             'FlashBias (a table-layout state dict loads into it by an SVD of its bias)')
        for layer in layers:
            layer.attn_type = attn_type
        return self

    @torch.no_grad()
    def deploy(self):
        """Fold per-forward constant work for inference (outputs unchanged up to rounding).

        The state dict keeps its layout and meaning, so a deployed model saves and loads like
        any other. ``train()`` or loading a state dict undoes it.
        """
        self.eval()
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.deploy()
        self.deployed = True
        return self

    def undeploy(self):
        self._kept_kernel = None
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.undeploy()
        self.deployed = False

    def _apply(self, fn, *args, **kwargs):  # new device/dtype: spectra are recomputed from the moved filter
        self._kept_kernel = None
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode and self.deployed:
            self.undeploy()
        return super().train(mode)


def _undeploy_after_load(module, incompatible_keys):
    module._trained_filter = None  # the loaded filter replaces the one a deploy() kept aside
    module.undeploy()  # loaded weights are raw: fold them again when deploying


def resample_subpixel_conv(state_dict: dict, prefix: str, channels: int, scale: int, log=None) -> None:
    """Re-sample a sub-pixel ``to_img`` conv trained at scale s' to ``scale`` in place.

    The weight is viewed as (channels, s', s', ...) and each s' x s' grid is bilinearly
    resized to scale x scale (align_corners False); the bias likewise.
    """
    weight_key, bias_key = prefix + 'to_img.weight', prefix + 'to_img.bias'
    weight = state_dict.get(weight_key)
    if weight is None or weight.dim() != 4 or weight.shape[0] == channels * scale * scale:
        return
    src = math.isqrt(weight.shape[0] // channels)
    if channels * src * src != weight.shape[0]:
        return  # not a sub-pixel conv: let load_state_dict report the shape mismatch

    def resize(t: torch.Tensor) -> torch.Tensor:
        rest = t.shape[1:]
        grid = t.reshape(channels, src, src, -1).permute(3, 0, 1, 2)  # (rest, channels, s', s')
        dtype = grid.dtype
        grid = F.interpolate(grid.double(), size=(scale, scale), mode='bilinear', align_corners=False).to(dtype)
        return grid.permute(1, 2, 3, 0).reshape(channels * scale * scale, *rest)

    state_dict[weight_key] = resize(weight)
    if bias_key in state_dict:
        state_dict[bias_key] = resize(state_dict[bias_key].unsqueeze(-1)).squeeze(-1)
    if log is not None:
        log(f'Re-sampled {weight_key} from x{src} to x{scale} (cross-scale initialisation).')
