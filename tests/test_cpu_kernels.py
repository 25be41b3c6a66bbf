"""The CPU kernels (esc_arch/kernels: window attention, ConvFFN, spectral product, ConvAttn layout) against
written-out references."""
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_fixture, randomize_, run_in_threads, tiny_config

import esc_arch.archs.layers as layers
import esc_arch.kernels as kernels_module
from esc_arch import ESC, ESCFP, ESCReal, WindowAttention
from esc_arch.archs.layers import (
    ConvFFN,
    ConvolutionalAttention,
    DecomposedConvolutionalAttention,
    LargeKernel,
    PartialConvAttn,
    conv_accumulate,
    conv_plus,
    padded_positions,
    reflect_pad_to_multiple,
    relative_position_bias,
    symmetrize_filter,
)
from esc_arch.kernels import (
    ATTENTION_BLOCK_ROWS,
    ENV_SWITCH,
    _build,
    conv1x1_op,
    conv3x3_op,
    conv_attn_merge_op,
    conv_ffn_op,
    cpu_supports_kernel,
    disabled,
    kernel_isa,
    layer_norm_op,
    pad_planes_op,
    spectral_mix_op,
    unavailable_reason,
    window_attention_op,
)

pytestmark = pytest.mark.skipif(not cpu_supports_kernel(), reason='the CPU kernels need an x86-64 CPU with AVX2')


@pytest.fixture(scope='module')
def op():
    if not any(shutil.which(cxx) for cxx in (os.environ.get('CXX', 'c++'), 'c++', 'g++')):
        pytest.skip('no C++ compiler on PATH to build the CPU kernels (the models fall back to PyTorch)')
    kernel = window_attention_op()
    assert kernel is not None, f'the CPU kernels did not build: {unavailable_reason()}'
    return kernel


@pytest.fixture(scope='module')
def ffn_op(op):
    return conv_ffn_op()


def attention_reference(q, k, v, table, ws):
    """Each pixel's attention over its window of the bottom/right reflect-padded image, written
    out in float64 on window tensors (as the model's SDPA path does); q/k/v (B, H, W, heads, c);
    ``table`` (heads, 2ws-1, 2ws-1), or a dense bias (heads, ws*ws, ws*ws)."""
    b, h, w, heads, c = q.shape

    def windows(t):  # -> (windows, heads, ws * ws, c) of the padded image
        t = reflect_pad_to_multiple(t.double().flatten(3).permute(0, 3, 1, 2), ws).permute(0, 2, 3, 1)
        t = t.reshape(b, t.shape[1] // ws, ws, t.shape[2] // ws, ws, heads, c).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(-1, heads, ws * ws, c), t.shape[1], t.shape[2]

    (qw, nh, nw), (kw, _, _), (vw, _, _) = windows(q), windows(k), windows(v)
    bias = table.double() if table.shape[-1] == ws * ws else relative_position_bias(table.double().flatten(1), ws)
    o = ((qw @ kw.transpose(-2, -1)) / math.sqrt(c) + bias).softmax(-1) @ vw
    o = o.view(b, nh, nw, heads, ws, ws, c).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nh * ws, nw * ws, heads, c)
    return o[:, :h, :w]


def image_qkv(b, h, w, heads, c, seed=0, scale=1.0):
    """q, k, v as the model makes them: strided views of one (B, H, W, 3, heads, c) tensor."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, w, 3, heads, c, generator=gen) * torch.tensor([scale, 1, 1])[:, None, None]).unbind(3)


def attend(op, q, k, v, table, ws, out=None, block_rows=0):
    """Run the kernel as the layer does (reflection maps of the padding); returns out."""
    out = torch.full_like(q, float('nan')) if out is None else out
    rows, cols = (padded_positions(n, ws) for n in q.shape[1:3])
    op(q, k, v, table, rows, cols, ws, q.shape[-1]**-0.5, out, block_rows)
    return out


def block_rows_of_this_build():
    """0 (the build's choice for this CPU) and every query-block shape the build has."""
    return [0, *ATTENTION_BLOCK_ROWS[kernel_isa()]] if kernel_isa() else [0]


@pytest.mark.parametrize('c', [8, 16, 24, 32])
@pytest.mark.parametrize('ws', [8, 16, 24])  # 8, 24: runs of 16 keys cross key rows
def test_kernel_matches_written_out_attention(op, c, ws):
    heads = 2
    q, k, v = image_qkv(2, 2 * ws, ws, heads, c)
    table = torch.randn(heads, 2 * ws - 1, 2 * ws - 1)
    expected = attention_reference(q, k, v, table, ws)
    for block_rows in block_rows_of_this_build():
        out = torch.full((2, ws, 2 * ws, heads, c), float('nan')).transpose(1, 2)  # a strided output
        attend(op, q, k, v, table, ws, out, block_rows)
        assert (out.double() - expected).abs().max().item() < 2e-5, block_rows


@pytest.mark.parametrize('h, w, ws', [
    (21, 13, 8),  # partial windows at the bottom, the right and the corner
    (19, 37, 16),  # rows of 3 and 5 queries: shorter than a block of queries
    (5, 7, 16),  # the padding is larger than the image: repeated reflection
    (1, 1, 8),  # one pixel
])
def test_kernel_reads_the_padding_from_the_image_and_writes_only_the_image(op, h, w, ws):
    heads, c = 3, 16
    q, k, v = image_qkv(2, h, w, heads, c, seed=1)
    table = torch.randn(heads, 2 * ws - 1, 2 * ws - 1)
    expected = attention_reference(q, k, v, table, ws)
    for block_rows in block_rows_of_this_build():  # window rows of 1, 5, 7, 8, 16 queries: blocks, tails
        out = attend(op, q, k, v, table, ws, block_rows=block_rows)
        assert (out.double() - expected).abs().max().item() < 2e-5, block_rows


@pytest.mark.parametrize('h, w, ws', [(16, 8, 8), (21, 13, 8), (19, 37, 16), (5, 7, 16), (1, 1, 8), (24, 24, 24)])
def test_kernel_with_a_dense_bias(op, h, w, ws):
    """FlashBias models' bias is no table: the kernel reads it dense, (heads, ws^2, ws^2)."""
    heads, c = 2, 16
    q, k, v = image_qkv(2, h, w, heads, c, seed=3)
    dense = torch.randn(heads, ws * ws, ws * ws)
    expected = attention_reference(q, k, v, dense, ws)
    for block_rows in block_rows_of_this_build():
        out = attend(op, q, k, v, dense, ws, block_rows=block_rows)
        assert (out.double() - expected).abs().max().item() < 2e-5, block_rows
    table = torch.randn(heads, 2 * ws - 1, 2 * ws - 1)  # a table's dense bias: the table's result
    assert torch.equal(attend(op, q, k, v, relative_position_bias(table.flatten(1), ws).contiguous(), ws),
                       attend(op, q, k, v, table, ws))


@pytest.mark.parametrize('scale', [30.0, 1e4])
def test_kernel_softmax_with_huge_score_gaps(op, scale):
    """Scores thousands apart: most weights underflow to (nearly) zero, none turns into garbage."""
    ws, heads, c = 8, 2, 16
    q, k, v = image_qkv(1, 8, 24, heads, c, seed=2, scale=scale)
    table = torch.randn(heads, 2 * ws - 1, 2 * ws - 1)
    out = attend(op, q, k, v, table, ws)
    assert torch.isfinite(out).all()
    assert (out.double() - attention_reference(q, k, v, table, ws)).abs().max().item() < 1e-4


def test_kernel_rejects_what_it_cannot_compute(op):
    q, k, v = image_qkv(1, 8, 8, 2, 16)
    table = torch.randn(2, 15, 15)
    out = torch.empty_like(q)
    rows = cols = padded_positions(8, 8)
    with pytest.raises(RuntimeError, match='float32 CPU tensors only'):
        op(q.double(), k.double(), v.double(), table.double(), rows, cols, 8, 0.25, out.double())
    with pytest.raises(RuntimeError, match=r'must be \(batch, height, width, heads, head_dim\)'):
        op(q[0], k[0], v[0], table, rows, cols, 8, 0.25, out[0])
    q4, k4, v4 = image_qkv(1, 4, 4, 2, 16)
    with pytest.raises(RuntimeError, match='window size must be a multiple of 8'):
        op(q4, k4, v4, torch.randn(2, 7, 7), padded_positions(4, 4), padded_positions(4, 4), 4, 0.25,
           torch.empty_like(q4))
    q12, k12, v12 = image_qkv(1, 8, 8, 2, 12)
    with pytest.raises(RuntimeError, match='head dim must be 8, 16, 24 or 32'):
        op(q12, k12, v12, table, rows, cols, 8, 0.25, torch.empty_like(q12))
    strided = torch.randn(2, 64, 65)[..., :64]
    for bad in (torch.randn(2, 13, 13), torch.randn(2, 64, 63), torch.randn(3, 64, 64), strided):
        with pytest.raises(RuntimeError, match=r'table must be a contiguous \(heads, 2w - 1, 2w - 1\) table or '
                                               r'\(heads, w\^2, w\^2\) dense bias'):
            op(q, k, v, bad, rows, cols, 8, 0.25, out)
    with pytest.raises(RuntimeError, match='rows must map the 8 padded positions'):
        op(q, k, v, table, padded_positions(8, 8)[:7], cols, 8, 0.25, out)
    with pytest.raises(RuntimeError, match=r'cols\[3\] = 9 is not a position of the image'):
        op(q, k, v, table, rows, padded_positions(8, 8).index_fill(0, torch.tensor([3]), 9), 8, 0.25, out)
    with pytest.raises(RuntimeError, match='must be a 1-D int64 CPU tensor'):
        op(q, k, v, table, rows.int(), cols, 8, 0.25, out)
    with pytest.raises(RuntimeError, match='block_rows must be 0'):
        op(q, k, v, table, rows, cols, 8, 0.25, out, 5)


def counting(monkeypatch, accessor='window_attention_op'):
    """Count the calls the layers make to one kernel (``accessor``: its function in layers)."""
    calls = []
    real = getattr(layers, accessor)()

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(layers, accessor, lambda: counted)
    return calls


@pytest.mark.parametrize('arch', [ESC, ESCFP])
def test_model_inference_uses_the_kernel_and_matches_sdpa(op, arch, monkeypatch):
    calls = counting(monkeypatch)
    model = randomize_(arch(**tiny_config(dim=32, window_size=8)), seed=2, scale=0.1).eval()
    x = torch.rand(2, 3, 21, 13)  # edge windows: partial rows and partial columns
    with torch.no_grad():
        model.set_attn_type('sdpa')
        expected = model(x)
        assert not calls
        model.set_attn_type('auto')
        fused = model(x)
    assert len(calls) == 1  # one block: one call for all windows, the edge ones too
    assert (fused - expected).abs().max().item() < 1e-5
    reference64 = model.double()(x.double()).detach()  # autograd on: SDPA in float64
    assert (fused.double() - reference64).abs().max().item() < 1e-4


@pytest.mark.parametrize('channels_last', [True, False])
def test_window_attention_layer_fused_in_either_layout_with_a_residual(op, channels_last, monkeypatch):
    """The layer's fused path (image layout, projections as convolutions, residual added inside
    oneDNN where it can) against its SDPA path in float64, NCHW or channels-last input."""
    calls = counting(monkeypatch)
    layer = randomize_(WindowAttention(32, 8, 2), seed=6, scale=0.3).eval()
    norm = randomize_(layers.LayerNorm2d(32), seed=7, scale=0.3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 19, 13).contiguous(memory_format=fmt)
    residual = torch.randn(2, 32, 19, 13).contiguous(memory_format=fmt)
    with torch.no_grad():
        out = layer(x, norm=norm, residual=residual.clone(memory_format=fmt))
        assert layer.last_backend == 'fused' and len(calls) == 1
        layer.double(), norm.double()
        expected = layer(x.double(), norm=norm) + residual.double()
    assert layer.last_backend == 'sdpa'  # float64: the plain path
    assert out.is_contiguous(memory_format=fmt)
    assert (out.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize('arch', ['ESC', 'ESCReal'])
def test_flashbias_model_inference_uses_the_kernel_and_matches_float64(op, arch, monkeypatch):
    calls = counting(monkeypatch)
    model = {'ESC': ESC, 'ESCReal': ESCReal}[arch](**tiny_config(dim=32, window_size=8, upscaling_factor=4),
                                                   attn_type='FlashBias', flashbias_rank=5)
    model = randomize_(model, seed=5, scale=0.1).eval()
    x = torch.rand(1, 3, 21, 13)
    with torch.no_grad():
        fused = model(x)
        model.deploy()
        deployed = model(x)
    assert len(calls) == 2 and model.blocks[0].attn.last_backend == 'fused'
    assert torch.equal(fused, deployed)
    reference64 = model.double()(x.double()).detach()  # autograd on: SDPA in float64
    assert (fused.double() - reference64).abs().max().item() < 1e-4


def test_training_never_uses_the_kernel(op, monkeypatch):
    calls = counting(monkeypatch)
    model = randomize_(ESC(**tiny_config(dim=32, window_size=8)), seed=4, scale=0.1).train()
    model(torch.rand(1, 3, 16, 16)).mean().backward()
    assert not calls
    assert model.blocks[0].attn.relative_position_bias.grad.abs().sum() > 0


@pytest.mark.parametrize('fixture', ['parity_esc_x4.pt', 'parity_escfp_x2.pt'])
def test_authors_fixtures_in_float32_through_the_kernels(op, fixture, monkeypatch):
    """The released computation through both kernels (fixture windows are 8x8) in float32."""
    calls = counting(monkeypatch)
    ffn_calls = counting(monkeypatch, 'conv_ffn_op')
    merges = counting(monkeypatch, 'conv_attn_merge_op')
    data = load_fixture(fixture)
    model = {'ESC': ESC, 'ESCFP': ESCFP}[data['type']](**data['config'])
    model.load_state_dict(data['state_dict'], strict=True)
    model.eval().float()
    with torch.no_grad():
        out = model(data['input'].float())
    assert calls
    assert ffn_calls  # the ConvFFN kernel, in either build
    assert merges  # the ConvAttns in place (ESC-FP: its dynamic 3x3 split off the depthwise K x K kernel)
    assert (out.double() - data['output_float64']).abs().max().item() < 1e-4


# ---- ConvFFN -------------------------------------------------------------------------
def ffn_reference(module: ConvFFN, x: torch.Tensor) -> torch.Tensor:
    """1x1 -> GELU -> depthwise 3x3 -> GELU + residual -> 1x1, written out in float64."""
    weights = {name: t.detach().double() for name, t in module.named_parameters()}
    h = F.gelu(F.conv2d(x.double(), weights['proj.weight'], weights['proj.bias']))
    d = F.conv2d(h, weights['dwc.weight'], weights['dwc.bias'], padding=1, groups=h.shape[1])
    return F.conv2d(F.gelu(d) + h, weights['aggr.weight'], weights['aggr.bias'])


def ffn_args(module: ConvFFN):
    hidden, dim = module.proj.out_channels, module.aggr.out_channels
    return (module.proj.weight.view(hidden, -1), module.proj.bias, module.dwc.weight.view(hidden, 9), module.dwc.bias,
            module.aggr.weight.view(dim, hidden), module.aggr.bias)


@pytest.mark.parametrize('dim, exp_ratio, size, x_scale', [
    (64, 1.25, (2, 9, 13), 2),  # ESC's ConvFFN (hidden 80), two images
    (32, 2, (1, 1, 1), 2),  # one pixel: every neighbour is padding
    (48, 1.25, (1, 1, 7), 2),  # hidden 60: padded to the vector width
    (24, 2.5, (1, 6, 1), 2),  # 24 outputs: not a multiple of 16
    (16, 4, (3, 2, 3), 2),
    (16, 2, (1, 4, 5), 1e4),  # pre-activations in the thousands: GELU is 0 or x, nothing else
])
def test_conv_ffn_kernel_matches_written_out_ffn(ffn_op, dim, exp_ratio, size, x_scale):
    torch.manual_seed(dim)
    module = ConvFFN(dim, 3, exp_ratio)
    for p in module.parameters():
        p.data.normal_(0, 0.3)  # weights large enough that GELU's negative side matters
    b, h, w = size
    x = torch.randn(b, dim, h, w) * x_scale
    out = torch.full((b, h, w, dim), float('nan'))
    ffn_op(x.permute(0, 2, 3, 1).contiguous(), *ffn_args(module), out)
    expected = ffn_reference(module, x)
    scale = max(1.0, expected.abs().max().item())  # float32 rounding grows with the values
    assert (out.permute(0, 3, 1, 2).double() - expected).abs().max().item() < 2e-6 * scale


def test_conv_ffn_kernel_gelu_to_float32_accuracy(ffn_op):
    """The kernel's GELU alone (identity 1x1s, zero depthwise: out = GELU(0) + GELU(x)) over
    [-9, 9] and beyond: within 3e-7 max(1, |x|) of the float64 GELU (PyTorch's float32 GELU is
    within 1.1e-6 here), 0 / x far out, a NaN kept (and spread to the pixel and its neighbours by
    the 1x1s and the depthwise conv, as in PyTorch)."""
    dim = 16
    x = torch.cat([torch.linspace(-9, 9, 4000 * dim), torch.tensor([-1e30, -50.0, 50.0, 1e30] * 4)]).view(1, 1, -1, dim)
    eye, zeros = torch.eye(dim), torch.zeros(dim)
    out = torch.empty_like(x)
    ffn_op(x, eye, zeros, torch.zeros(dim, 9), zeros, eye, zeros, out)
    expected = F.gelu(x.double())
    assert ((out.double() - expected).abs() / x.double().abs().clamp(min=1)).max().item() < 3e-7
    assert (out.double() - expected).abs()[x < -5].max().item() < 1e-6  # 1 + erf: float32 cancellation
    assert torch.equal(out[x.abs() >= 50], F.relu(x[x.abs() >= 50]))
    x[0, 0, 0, 0] = float('nan')
    ffn_op(x, eye, zeros, torch.zeros(dim, 9), zeros, eye, zeros, out)
    assert out[0, 0, 0].isnan().all()  # the pixel's 1x1 mixes every channel


def test_conv_ffn_kernel_rejects_what_it_cannot_compute(ffn_op):
    module = ConvFFN(12, 3, 2)  # 12 output channels: not a multiple of 8
    x = torch.randn(1, 3, 4, 12)
    with pytest.raises(RuntimeError, match='output channels must be a multiple of 8'):
        ffn_op(x, *ffn_args(module), torch.empty(1, 3, 4, 12))
    module = ConvFFN(16, 3, 2)
    x = torch.randn(1, 3, 4, 16)
    with pytest.raises(RuntimeError, match='contiguous tensors only'):
        ffn_op(x.transpose(1, 2), *ffn_args(module), torch.empty(1, 4, 3, 16))
    with pytest.raises(RuntimeError, match='float32 CPU tensors only'):
        ffn_op(x.double(), *ffn_args(module.double()), torch.empty(1, 3, 4, 16, dtype=torch.float64))
    module.float()
    with pytest.raises(RuntimeError, match=r'out must be \(B, H, W, C_out\)'):
        ffn_op(x, *ffn_args(module), torch.empty(1, 3, 5, 16))
    with pytest.raises(RuntimeError, match='weights must be'):
        ffn_op(torch.randn(1, 3, 4, 8), *ffn_args(module), torch.empty(1, 3, 4, 16))


def test_conv_ffn_layer_uses_the_kernel_only_for_channels_last_inference(ffn_op, monkeypatch):
    calls = counting(monkeypatch, 'conv_ffn_op')
    torch.manual_seed(3)
    module = ConvFFN(32, 3, 1.25)
    for p in module.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 32, 11, 6)
    expected = ffn_reference(module, x)
    with torch.no_grad():
        planar = module(x)  # NCHW: PyTorch's operators
        assert not calls
        fused = module(x.contiguous(memory_format=torch.channels_last))
        assert len(calls) == 1
    assert fused.is_contiguous(memory_format=torch.channels_last) and fused.shape == planar.shape
    assert (fused.double() - expected).abs().max().item() < 1e-4
    assert (fused - planar).abs().max().item() < 1e-5
    grad_out = module(x.contiguous(memory_format=torch.channels_last).requires_grad_())  # autograd: PyTorch
    assert len(calls) == 1 and grad_out.requires_grad


# ---- ConvAttn layout kernels ---------------------------------------------------------
def channels_last_slice(b, h, w, channels, planes, seed=0):
    """The first ``planes`` channels of a channels-last (B, H, W, channels) image: a strided view."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, w, channels, generator=gen)[..., :planes]


@pytest.mark.parametrize('b, h, w, planes, hf, wf', [
    (2, 5, 7, 20, 9, 12),  # planes and widths off the 8 x 8 blocks
    (1, 16, 24, 16, 16, 24),  # no padding
    (1, 1, 1, 3, 4, 4),  # one pixel
])
def test_pad_planes_writes_the_planes_and_zeros_around_them(op, b, h, w, planes, hf, wf):
    x = channels_last_slice(b, h, w, planes + 4, planes)
    out = torch.full((b, planes, hf, wf), float('nan'))
    pad_planes_op()(x, out)
    assert torch.equal(out, F.pad(x.permute(0, 3, 1, 2), (0, wf - w, 0, hf - h)))


@pytest.mark.parametrize('b, h, w, planes', [(2, 9, 13, 16), (1, 1, 1, 5), (1, 2, 17, 24), (1, 11, 1, 8)])
def test_conv_attn_merge_adds_the_dynamic_3x3_and_writes_channels_last(op, b, h, w, planes):
    gen = torch.Generator().manual_seed(h * w)
    lk = torch.randn(b, planes, h + 3, w + 5, generator=gen)[..., :h, :w]  # strided planes, as the FFT's crop
    x1 = torch.randn(b, planes, h + 1, w + 2, generator=gen)[..., :h, :w]
    kernel = torch.randn(b, planes, 9, generator=gen)
    pixels = torch.full((b, h, w, planes + 3), float('nan'))
    conv_attn_merge_op()(lk, x1, kernel, pixels[..., :planes])
    dw = F.conv2d(x1.double().reshape(1, b * planes, h, w), kernel.double().view(b * planes, 1, 3, 3), padding=1,
                  groups=b * planes)
    expected = (lk.double() + dw.view(b, planes, h, w)).permute(0, 2, 3, 1)
    assert (pixels[..., :planes].double() - expected).abs().max().item() < 1e-5
    assert pixels[..., planes:].isnan().all()  # the other channels untouched


def test_conv_attn_kernels_reject_what_they_cannot_compute(op):
    x = channels_last_slice(1, 4, 4, 8, 8)
    with pytest.raises(RuntimeError, match='out must be a contiguous'):
        pad_planes_op()(x, torch.empty(1, 8, 3, 4))  # smaller than the image
    with pytest.raises(RuntimeError, match='float32 CPU tensors only'):
        pad_planes_op()(x.double(), torch.empty(1, 8, 4, 4, dtype=torch.float64))
    planes = torch.randn(1, 8, 4, 4)
    with pytest.raises(RuntimeError, match=r'kernel must be a contiguous float32 \(B, P, 9\)'):
        conv_attn_merge_op()(planes, planes, torch.randn(1, 8, 3, 3), x)
    with pytest.raises(RuntimeError, match=r'out must be \(B, H, W, P\)'):
        conv_attn_merge_op()(planes, planes, torch.randn(1, 8, 9), x[..., :4])
    with pytest.raises(RuntimeError, match='same'):
        conv_attn_merge_op()(planes, planes[..., :3], torch.randn(1, 8, 9), x)


@pytest.mark.parametrize('size', [(20, 24), (45, 38)])  # below and above FFT_MIN_PIXELS
@pytest.mark.parametrize('decomposed', [False, True])  # ESC's attention, ESC-FP's
def test_conv_attn_in_place_matches_its_forward(op, size, decomposed, monkeypatch):
    """PartialConvAttn at channels-last inference goes through pad_planes / conv_attn_merge (and
    the FFT on the larger image) and gives what the plain forward gives in float64."""
    merges = counting(monkeypatch, 'conv_attn_merge_op')
    gen = torch.Generator().manual_seed(6)
    if decomposed:  # ESC-FP: 1x1 lk_channel, then lk_spatial + the dynamic 3x3 as one depthwise kernel
        plk = DecomposedConvolutionalAttention(16)
        lk_channel = torch.randn(16, 16, 1, 1, generator=gen) * 0.3
        lk = LargeKernel(torch.randn(16, 1, 13, 13, generator=gen) * 0.05, depthwise=True)
        filters, filters64 = (lk_channel, lk), (lk_channel.double(), lk.weight.double())
    else:
        plk = ConvolutionalAttention(16)
        lk = LargeKernel(symmetrize_filter(torch.randn(16, 16, 13, 13, generator=gen) * 0.05))
        filters, filters64 = (lk, ), (lk.weight.double(), )
    module = randomize_(PartialConvAttn(32, 16, plk), seed=5, scale=0.3).eval()
    x = torch.randn(2, 32, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = module(x.clone(memory_format=torch.channels_last), *filters, overwrite_input=True)
        expected = module.double()(x.double(), *filters64)
    assert len(merges) == 1
    assert lk.use_fft(x) == (size[0] * size[1] >= layers.FFT_MIN_PIXELS)
    assert (out.double() - expected).abs().max().item() < 1e-4


# ---- LayerNorm -----------------------------------------------------------------------
@pytest.mark.parametrize('shape', [(1, 9, 13, 64), (2, 5, 20), (7, 1), (3, 33)])  # tails off the vector width
def test_layer_norm_kernel_matches_pytorch(op, shape):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen) * 3 + 1
    weight, bias = torch.randn(shape[-1], generator=gen), torch.randn(shape[-1], generator=gen)
    out = torch.full_like(x, float('nan'))
    layer_norm_op()(x, weight, bias, 1e-6, out)
    expected = F.layer_norm(x.double(), shape[-1:], weight.double(), bias.double(), 1e-6)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_layer_norm_kernel_rejects_what_it_cannot_compute(op):
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match='float32 CPU tensors only'):
        layer_norm_op()(x.double(), w.double(), w.double(), 1e-6, x.double())
    with pytest.raises(RuntimeError, match='contiguous and of the same shape'):
        layer_norm_op()(x.t(), w[:4], w[:4], 1e-6, torch.empty(8, 4))
    with pytest.raises(RuntimeError, match=r"weight and bias must have the last dim's size \(8\)"):
        layer_norm_op()(x, w[:7], w[:7], 1e-6, torch.empty_like(x))


def test_layer_norm_layer_uses_the_kernel_at_channels_last_inference(op, monkeypatch):
    calls = counting(monkeypatch, 'layer_norm_op')
    norm = randomize_(layers.LayerNorm2d(24), seed=8, scale=0.5)
    x = torch.randn(2, 24, 7, 9)
    expected = norm.double()(x.double()).detach()
    norm.float()
    with torch.no_grad():
        out = norm(x.contiguous(memory_format=torch.channels_last))
        assert len(calls) == 1 and out.is_contiguous(memory_format=torch.channels_last)
        out_nchw = norm(x)  # NCHW: the permuted view is not contiguous, PyTorch's layer_norm
        assert len(calls) == 1
    assert (out.double() - expected).abs().max().item() < 1e-5
    assert (out_nchw.double() - expected).abs().max().item() < 1e-5


# ---- spectral channel mixing ---------------------------------------------------------
def spectral_mix_reference(signal, rows, cols):
    """sum_i signal[b, i, u, v] sum_t rows[u, i, o, t] cols[t, v], written out in float64."""
    spectrum = torch.einsum('uiot,tv->iouv', rows.double(), cols.double())
    return (torch.view_as_complex(signal.double())[:, :, None] * spectrum[None]).sum(1)


@pytest.mark.parametrize('batch, cin, cout, height, width, taps', [
    (1, 16, 16, 192, 169, 7),  # ESC at 180x320: 169 = whole vectors + a partial one
    (2, 3, 5, 7, 9, 4), (1, 4, 2, 5, 32, 8), (1, 2, 3, 4, 3, 2)])  # 32: whole vectors only; 3: a partial one only
def test_spectral_mix_matches_written_out_sum(op, batch, cin, cout, height, width, taps):
    gen = torch.Generator().manual_seed(height * width)
    signal = torch.randn(batch, cin, height, width, 2, generator=gen)
    rows, cols = torch.randn(height, cin, cout, taps, generator=gen), torch.randn(taps, width, generator=gen)
    out = torch.full((batch, cout, height, width, 2), float('nan'))
    spectral_mix_op()(signal, rows, cols, out)
    error = (torch.view_as_complex(out).cdouble() - spectral_mix_reference(signal, rows, cols)).abs().max().item()
    assert error < 1e-5 * taps * cin


def test_spectral_mix_rejects_what_it_cannot_compute(op):
    signal, rows, cols, out = (torch.randn(1, 3, 4, 8, 2), torch.randn(4, 3, 2, 5), torch.randn(5, 8),
                               torch.empty(1, 2, 4, 8, 2))
    with pytest.raises(RuntimeError, match='must agree'):
        spectral_mix_op()(signal, rows, torch.randn(5, 9), out)
    with pytest.raises(RuntimeError, match='contiguous float32 CPU tensors only'):
        spectral_mix_op()(signal.double(), rows.double(), cols.double(), out.double())
    with pytest.raises(RuntimeError, match=r'signal \(B, I, H, W, 2\)'):
        spectral_mix_op()(signal[..., 0].contiguous(), rows, cols, out)
    with pytest.raises(RuntimeError, match='2 to 8 terms'):
        spectral_mix_op()(signal, torch.randn(4, 3, 2, 9), torch.randn(9, 8), out)


def test_large_kernel_keeps_spectrum_factors_for_a_mirror_symmetric_filter(op):
    torch.manual_seed(5)
    weight = torch.randn(6, 6, 13, 13)
    point_symmetric = (weight + weight.flip(-2, -1)) / 2  # real spectrum, but not factored this way
    for filt, factored in ((symmetrize_filter(weight), True), (weight, False), (point_symmetric, False)):
        lk = LargeKernel(filt)
        for h, w in [(40, 40), (37, 53), (33, 64)]:
            x = torch.randn(2, 6, h, w)
            with torch.no_grad():
                out = lk(x)
            expected = F.conv2d(x.double(), filt.double(), padding=6)
            assert (out.double() - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
        assert all(key[2] == factored and isinstance(t, tuple) == factored for key, t in lk._spectra.items())
    with disabled(), torch.no_grad():  # without the kernels: the complex spectrum, same values
        lk = LargeKernel(symmetrize_filter(weight))
        x = torch.randn(1, 6, 40, 40)
        out = lk(x)
        assert all(torch.is_tensor(t) and t.is_complex() for t in lk._spectra.values())
    expected = F.conv2d(x.double(), lk.weight.double(), padding=6)
    assert (out.double() - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


# ---- 3x3 convolution (Winograd) -------------------------------------------------------
def conv3x3_check(b, h, w, cin, cout, residual, seed=0, tile=2):
    """Run the conv3x3 kernel (Winograd tiles of ``tile`` x ``tile`` outputs) on a channels-last input;
    its error against float64 conv2d (+ residual), relative to the largest output."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, cin, generator=gen)
    weight, bias = torch.randn(cout, cin, 3, 3, generator=gen) / cin, torch.randn(cout, generator=gen)
    res = torch.randn(b, h, w, cout, generator=gen) if residual else None
    out = torch.full((b, h, w, cout), float('nan'))
    conv3x3_op()(x, weight, bias, res, out, tile)
    expected = F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), bias.double(), padding=1).permute(0, 2, 3, 1)
    if residual:
        expected = expected + res.double()
    return (out.double() - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize('b, h, w, cin, cout', [
    (1, 18, 20, 64, 64), (2, 7, 9, 16, 48),  # odd sizes: tiles hanging over the bottom / right edge
    (1, 1, 1, 8, 8), (1, 1, 6, 24, 16), (1, 5, 1, 16, 24), (1, 2, 3, 40, 8),  # vectors of 8 and 16 mixed
    (2, 3, 601, 64, 64)])  # 301 tiles a row: runs of 101, 101, 99 (1 MB of scratch each)
@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('tile', [2, 4])
def test_conv3x3_kernel_matches_float64_conv(op, b, h, w, cin, cout, residual, tile):
    # F(2x2, 3x3): points 0, +-1, the rounding of a direct sum (~1e-7); F(4x4, 3x3) also scales by 2, 4,
    # 5, 8 and cancels more (~1e-6 at 64 channels)
    assert conv3x3_check(b, h, w, cin, cout, residual, tile=tile) < (2e-6 if tile == 2 else 5e-6)


def test_conv3x3_kernel_rejects_what_it_cannot_compute(op):
    x, weight, bias, out = torch.randn(1, 4, 5, 16), torch.randn(8, 16, 3, 3), torch.randn(8), torch.empty(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match='multiples of 8'):
        conv3x3_op()(torch.randn(1, 4, 5, 12), torch.randn(8, 12, 3, 3), bias, None, out)
    with pytest.raises(RuntimeError, match=r'weight \(O, C, 3, 3\)'):
        conv3x3_op()(x, torch.randn(8, 16, 5, 5), bias, None, out)
    with pytest.raises(RuntimeError, match=r'x \(B, H, W, C\)'):  # 3-D: named, not an index error
        conv3x3_op()(x[0], weight, bias, None, out)
    with pytest.raises(RuntimeError, match='residual must be'):
        conv3x3_op()(x, weight, bias, torch.randn(1, 4, 5, 16), out)
    with pytest.raises(RuntimeError, match='contiguous float32 CPU tensors only'):
        conv3x3_op()(x.double(), weight.double(), bias.double(), None, out.double())
    with pytest.raises(RuntimeError, match='tile must be 0'):
        conv3x3_op()(x, weight, bias, None, out, 3)


@pytest.mark.parametrize('size, tile', [((9, 11), 2), ((80, 80), 4), ((40, 200), 4)])
def test_conv_plus_picks_the_winograd_tile_by_size(op, size, tile, monkeypatch):
    real, tiles = layers.conv3x3_op(), []
    monkeypatch.setattr(layers, 'conv3x3_op', lambda: lambda *args: (tiles.append(args[-1]), real(*args)))
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(1, 16, *size)
    with torch.no_grad():
        out = conv_plus(conv, x.contiguous(memory_format=torch.channels_last))
    assert tiles == [tile] and (tile == 4) == (size[0] * size[1] >= layers.WINOGRAD_F4_MIN_PIXELS)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert (out.double() - expected).abs().max().item() < 5e-6 * expected.abs().max().item()


def test_winograd_f4_tiles_really_run(op):
    # the tile argument alone proved nothing: F(4x4) rounds differently from F(2x2) (both near float64)
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = torch.randn(1, 24, 24, 32, generator=gen), torch.randn(32, 32, 3, 3, generator=gen) / 32, \
        torch.randn(32, generator=gen)
    outs = {}
    for tile in (2, 4):
        outs[tile] = torch.full((1, 24, 24, 32), float('nan'))
        conv3x3_op()(x, weight, bias, None, outs[tile], tile)
    expected = F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), bias.double(), padding=1).permute(0, 2, 3, 1)
    assert not torch.equal(outs[2], outs[4])
    for out in outs.values():
        assert (out.double() - expected).abs().max().item() < 5e-6 * expected.abs().max().item()


def test_conv_helpers_fall_back_where_the_kernels_do_not_apply(op):
    # conv_plus: other paddings, a residual broadcast over the batch; conv_accumulate: reflect padding
    # (oneDNN's fused add pads with zeros)
    torch.manual_seed(6)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for padding in (0, 2):
            conv = nn.Conv2d(8, 8, 3, padding=padding)
            assert torch.allclose(conv_plus(conv, x), conv(x), atol=1e-5), padding
        conv = nn.Conv2d(8, 8, 3, padding=1)
        residual = torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)
        assert torch.allclose(conv_plus(conv, x, residual), conv(x) + residual, atol=1e-5)
        reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode='reflect')
        residual = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
        expected = residual + reflect(x)
        assert torch.allclose(conv_accumulate(residual.clone(), reflect, x), expected, atol=1e-5)


def test_conv_plus_uses_the_kernel_only_for_channels_last_inference(op, monkeypatch):
    calls = counting(monkeypatch, 'conv3x3_op')
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    x, residual = torch.randn(2, 16, 9, 11), torch.randn(2, 24, 9, 11)
    x_cl, residual_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + residual.double()
    with torch.no_grad():
        planar = conv_plus(conv, x, residual)  # NCHW: PyTorch's convolution
        assert not calls
        fused = conv_plus(conv, x_cl, residual_cl)
        assert len(calls) == 1
        assert fused.is_contiguous(memory_format=torch.channels_last) and torch.equal(residual_cl, residual)
        alone = conv_plus(conv, x_cl)
        assert len(calls) == 2
        strided = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        conv_plus(strided, x_cl)  # not a kernel shape: PyTorch's
        assert len(calls) == 2
    for out in (planar, fused):
        assert (out.double() - expected).abs().max().item() < 1e-5
    assert (alone.double() + residual.double() - expected).abs().max().item() < 1e-5
    grad_out = conv_plus(conv, x_cl.requires_grad_(), residual_cl)  # autograd: PyTorch
    assert len(calls) == 2 and grad_out.requires_grad


@pytest.mark.parametrize('arch', [ESC, ESCFP])
def test_models_keep_the_small_winograd_tile_for_their_output_conv(op, arch, monkeypatch):
    """At a size where conv_plus picks F(4x4), conv_out and last take it, to_img (the image) F(2x2)."""
    real, tiles = layers.conv3x3_op(), []
    monkeypatch.setattr(layers, 'conv3x3_op', lambda: lambda *args: (tiles.append((args[1].shape[0], args[-1])),
                                                                        real(*args)))
    model = randomize_(arch(**tiny_config(upscaling_factor=4, window_size=8)), seed=3, scale=0.1).eval()
    x = torch.rand(1, 3, 80, 88)
    with torch.no_grad():
        out = model(x)
        expected = model.double()(x.double())
    to_img = 3 * 4 * 4
    assert tiles == [(16, 4), (16, 4), (to_img, 2)], tiles  # conv_out (one block), last, to_img
    assert (out.double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize('arch, kernel_convs', [(ESC, 3), (ESCFP, 3), (ESCReal, 5)])
def test_models_run_their_3x3_convs_through_the_kernel(op, arch, kernel_convs, monkeypatch):
    """Block conv_out + skip, trunk last + skip and to_img (48 channels at x4; ESC-Real: its three
    dim -> dim upsampler convs, not the last, 3-channel one) at float32 inference."""
    calls = counting(monkeypatch, 'conv3x3_op')
    model = randomize_(arch(**tiny_config(upscaling_factor=4, window_size=8)), seed=3, scale=0.1).eval()
    x = torch.rand(1, 3, 19, 13)
    with torch.no_grad():
        out = model(x)
        assert len(calls) == kernel_convs
        expected = model.double()(x.double())  # float64: PyTorch's convolutions
    assert (out.double() - expected).abs().max().item() < 1e-4


# ---- 1x1 convolution ------------------------------------------------------------------
@pytest.mark.parametrize('b, h, w, cin, cout', [
    (1, 18, 20, 64, 192), (1, 9, 31, 64, 64),  # ESC's qkv and 64 -> 64; 279 pixels: a task of 23
    (2, 3, 5, 3, 8), (1, 1, 1, 16, 24), (1, 4, 70, 40, 48),  # odd channels, one pixel, 24 and 48 outputs
])
@pytest.mark.parametrize('residual', [None, 'separate', 'in place'])
def test_conv1x1_kernel_matches_float64_conv(op, b, h, w, cin, cout, residual):
    gen = torch.Generator().manual_seed(cin + cout)
    x = torch.randn(b, h, w, cin, generator=gen)
    weight, bias = torch.randn(cout, cin, generator=gen), torch.randn(cout, generator=gen)
    res = torch.randn(b, h, w, cout, generator=gen)
    expected = x.double() @ weight.double().T + bias.double() + (0 if residual is None else res.double())
    out = res if residual == 'in place' else torch.full((b, h, w, cout), float('nan'))
    conv1x1_op()(x, weight, bias, None if residual is None else res.clone() if residual == 'separate' else res, out)
    assert (out.double() - expected).abs().max().item() < 2e-6 * expected.abs().max().item()


def test_conv1x1_kernel_rejects_what_it_cannot_compute(op):
    x, weight, bias, out = torch.randn(1, 4, 5, 16), torch.randn(8, 16), torch.randn(8), torch.empty(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match='output channels must be a multiple of 8, got 12'):
        conv1x1_op()(x, torch.randn(12, 16), torch.randn(12), None, torch.empty(1, 4, 5, 12))
    with pytest.raises(RuntimeError, match=r'weight \(O, C\)'):
        conv1x1_op()(x, torch.randn(8, 16, 1, 1), bias, None, out)
    with pytest.raises(RuntimeError, match=r'x \(B, H, W, C\)'):
        conv1x1_op()(x[0], weight, bias, None, out)
    with pytest.raises(RuntimeError, match='residual must be a contiguous'):
        conv1x1_op()(x, weight, bias, torch.randn(1, 4, 5, 16), out)
    shared = torch.zeros(2, 1, 4, 5, 8)  # two (1, 4, 5, 8) maps in one storage
    with pytest.raises(RuntimeError, match='residual must be out itself or not share its storage'):
        conv1x1_op()(x, weight, bias, shared[1], shared[0])
    with pytest.raises(RuntimeError, match="out must not share x's storage"):
        conv1x1_op()(shared[0], torch.randn(8, 8), bias, None, shared[0])
    with pytest.raises(RuntimeError, match='contiguous float32 CPU tensors only'):
        conv1x1_op()(x.transpose(1, 2), weight, bias, None, out.transpose(1, 2))


def test_1x1_convs_use_the_kernel_only_in_the_avx2_build_for_channels_last_inference(op, monkeypatch):
    calls = counting(monkeypatch, 'conv1x1_op')
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 24, 1)
    x, residual = torch.randn(2, 16, 9, 11), torch.randn(2, 24, 9, 11)
    x_cl, residual_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double()) + residual.double()
    avx2 = kernel_isa() == 'avx2'
    with torch.no_grad():
        outs = [conv_plus(conv, x, residual), conv_accumulate(residual.clone(), conv, x)]  # NCHW: PyTorch's
        assert not calls
        outs.append(conv_plus(conv, x_cl, residual_cl))
        assert torch.equal(residual_cl, residual)
        target = residual_cl.clone()
        outs.append(conv_accumulate(target, conv, x_cl))  # written into the residual
        assert outs[-1] is target and outs[-1].is_contiguous(memory_format=torch.channels_last)
        assert len(calls) == (2 if avx2 else 0)
        conv_plus(nn.Conv2d(16, 24, 1, stride=2), x_cl)  # not a kernel shape: PyTorch's
        conv_plus(nn.Conv2d(16, 12, 1), x_cl)  # 12 outputs: PyTorch's
        assert len(calls) == (2 if avx2 else 0)
    for out in outs:
        assert (out.double() - expected).abs().max().item() < 1e-5
    grad_out = conv_plus(conv, x_cl.requires_grad_(), residual_cl)  # autograd: PyTorch
    assert len(calls) == (2 if avx2 else 0) and grad_out.requires_grad


def test_models_run_their_1x1_convs_through_the_kernel_in_the_avx2_build(op, monkeypatch):
    """Per block of ESC: the attention's qkv and output projection, and the ConvAttns' aggr."""
    calls = counting(monkeypatch, 'conv1x1_op')
    config = tiny_config(upscaling_factor=2, window_size=8)
    model = randomize_(ESC(**config), seed=6, scale=0.1).eval()
    x = torch.rand(1, 3, 19, 13)
    with torch.no_grad():
        out = model(x)
        expected = model.double()(x.double())
    per_block = 2 + config['conv_blocks']
    assert len(calls) == (config['n_blocks'] * per_block if kernel_isa() == 'avx2' else 0)
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, '0')
    ok, why = _build()
    assert not ok and why == f'{ENV_SWITCH}=0'
    assert kernel_isa() is None


def test_without_a_compiler_one_warning_names_it_and_the_users_line(tmp_path):
    # a child without c++ on PATH and an empty extensions folder: the fallback warns once, saying
    # why and pointing at the script's line that ran the model, and computes the same values
    script = tmp_path / 'run_model.py'
    script.write_text(textwrap.dedent('''
        import warnings
        import torch, esc_arch
        net = esc_arch.ESC(dim=16, pdim=16, kernel_size=7, n_blocks=1, conv_blocks=1, window_size=8,
                           num_heads=1, upscaling_factor=2).eval()
        x = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter('always')
            y = net(x)
            y = net(x)
        for w in caught:
            print(f'WARNING {w.filename}:{w.lineno}: {w.message}')
        print('ERROR', (y.double() - net.double()(x.double())).abs().max().item())
    '''))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable), TORCH_EXTENSIONS_DIR=str(tmp_path / 'ext'))
    env.pop('CXX', None)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    warned = [line for line in lines if line.startswith('WARNING') and 'CPU kernels are unavailable' in line]
    assert len(warned) == 1 and 'no C++ compiler: c++ is not on PATH' in warned[0], lines
    assert warned[0].startswith(f'WARNING {script}:9:'), warned  # the first y = net(x), not a line of esc_arch
    assert float(lines[-1].split()[1]) < 1e-4


def test_a_first_build_is_announced(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    from esc_arch.kernels import _announce_a_first_build
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    _announce_a_first_build(cpp_extension, 'esc_arch_never_built', 'avx2')
    assert 'compiling the CPU kernels (avx2) for this install, once' in capsys.readouterr().err
    import torch._C
    library = tmp_path / 'esc_arch_never_built' / 'esc_arch_never_built.so'
    whole = Path(torch._C.__file__).read_bytes()  # an ELF shared library
    library.write_bytes(whole)
    _announce_a_first_build(cpp_extension, 'esc_arch_never_built', 'avx2')
    assert capsys.readouterr().err == '' and library.exists()
    # a library cut short (a full disk, a killed copy) crashed the process with SIGBUS as it loaded,
    # and ninja, seeing it newer than its objects, did not link it again: it is removed to be relinked
    library.write_bytes(whole[:len(whole) // 2])
    _announce_a_first_build(cpp_extension, 'esc_arch_never_built', 'avx2')
    assert 'compiling the CPU kernels' in capsys.readouterr().err and not library.exists()


@pytest.mark.parametrize('size', [0, 40])
def test_a_library_cut_short_within_its_elf_header_is_linked_again(tmp_path, monkeypatch, capsys, size):
    # an empty library, or one shorter than its 64-byte ELF header, passed as complete: it was kept,
    # ninja did not link it again, and every process fell back to PyTorch's operators ("building it
    # failed: Could not load this library"); the kernels are built for x86-64 only, a 64-bit ELF
    import torch._C
    from torch.utils import cpp_extension

    from esc_arch.kernels import _announce_a_first_build, complete_elf
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    library = tmp_path / 'esc_arch_never_built' / 'esc_arch_never_built.so'
    library.parent.mkdir()
    library.write_bytes(Path(torch._C.__file__).read_bytes()[:size])
    assert not complete_elf(str(library))
    _announce_a_first_build(cpp_extension, 'esc_arch_never_built', 'avx2')
    # made older than any object file rather than removed: ld starts a link with an empty file
    assert 'compiling the CPU kernels' in capsys.readouterr().err and library.stat().st_mtime == 0


def test_an_unknown_switch_value_is_warned_about(monkeypatch):
    monkeypatch.setattr(kernels_module, '_state', {})
    monkeypatch.setattr(kernels_module, '_build', lambda: (False, 'not built in this test'))
    monkeypatch.setenv(ENV_SWITCH, 'avx512')  # not a choice: the build follows the CPU
    with pytest.warns(UserWarning) as caught:
        kernels_module._loaded()
    assert f"{ENV_SWITCH}='avx512' means nothing here" in str(caught[0].message)
    monkeypatch.setattr(kernels_module, '_state', {})
    for value in ('AVX2', ''):  # any case; set but empty: the default
        monkeypatch.setattr(kernels_module, '_state', {})
        monkeypatch.setenv(ENV_SWITCH, value)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            kernels_module._loaded()
        assert [str(w.message) for w in caught if 'means nothing' in str(w.message)] == [], value


def test_a_library_built_before_loads_without_a_compiler_or_a_writable_folder(op, tmp_path, monkeypatch):
    # a shared install built once into a read-only place, or a node without g++: PyTorch's loader
    # must lock the folder (and compile), so the models fell back to PyTorch's slower operators
    from torch.utils import cpp_extension
    script = tmp_path / 'prebuilt.py'
    script.write_text('import esc_arch.kernels as k\n'
                      'print(k.window_attention_op() is not None, k.unavailable_reason())\n')
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no c++; the extensions folder already built
    env.pop('CXX', None)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[0] == 'True', (result.stdout, result.stderr[-2000:])
    assert 'CUDA' not in result.stderr, result.stderr  # PyTorch's loader's "No CUDA runtime is found" on import

    def read_only(**kwargs):
        raise OSError(30, 'Read-only file system', 'lock')
    monkeypatch.setattr(cpp_extension, 'load', read_only)
    assert _build() == (True, None)
    name = kernels_module.build_name(kernel_isa())
    assert not kernels_module._load_prebuilt(name, 'deadbeef0000')  # built from other sources: not loaded


def test_a_failed_build_names_the_compilers_error(monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(kernels_module, '_announce_a_first_build', lambda *args: None)
    monkeypatch.setattr(kernels_module, '_load_prebuilt', lambda *args: False)  # no earlier build to fall back on

    def fails(**kwargs):
        raise RuntimeError('Error building extension \'x\': [1/3] c++ -c a.cpp\nFAILED: a.o\n'
                           'a.cpp:3:1: error: expected \';\' before \'}\' token\n'
                           'ninja: build stopped: subcommand failed.')
    monkeypatch.setattr(cpp_extension, 'load', fails)
    monkeypatch.setenv('CXX', f'env {shutil.which("c++") or sys.executable}')  # a command with arguments
    if kernel_isa() is None:
        pytest.skip('no build on this CPU')
    ok, why = _build()
    assert not ok and why == "building it failed: a.cpp:3:1: error: expected ';' before '}' token", why


def test_the_avx2_build_on_an_avx512_cpu(op):
    """Where this process runs the AVX-512 build, the AVX2 one (other CPUs' kernels) must be
    right too: it is built and checked in a child process (one build per process)."""
    if kernel_isa() != 'avx512':
        pytest.skip('this CPU runs the AVX2 build, which the other tests check')
    script = textwrap.dedent('''
        import torch
        from esc_arch.kernels import kernel_isa, window_attention_op
        from esc_arch.archs.layers import ConvFFN, LargeKernel, symmetrize_filter
        from test_cpu_kernels import attend, attention_reference, image_qkv
        import test_cpu_kernels as checks
        assert kernel_isa() == 'avx2', kernel_isa()
        op = window_attention_op()
        assert op is not None
        checks.test_pad_planes_writes_the_planes_and_zeros_around_them(op, 2, 5, 7, 20, 9, 12)
        checks.test_conv_attn_merge_adds_the_dynamic_3x3_and_writes_channels_last(op, 2, 9, 13, 16)
        checks.test_layer_norm_kernel_matches_pytorch(op, (3, 33))
        errors = []
        for c in (8, 16, 24, 32):
            # rows of 8, 16, 24 queries (blocks of 6 and 4), of 5 and 7 (overlapping blocks), of 2 (single)
            for ws, h, w in ((8, 8, 16), (16, 16, 16), (16, 21, 5), (16, 9, 18), (24, 7, 31)):
                q, k, v = image_qkv(2, h, w, 2, c, seed=c + ws)
                table = torch.randn(2, 2 * ws - 1, 2 * ws - 1, generator=torch.Generator().manual_seed(c))
                out = attend(op, q, k, v, table, ws)
                errors.append((out.double() - attention_reference(q, k, v, table, ws)).abs().max().item())
        from esc_arch.kernels import conv_ffn_op
        import torch.nn.functional as F
        for dim, hidden, x_scale in ((32, 40, 1), (24, 60, 1), (32, 40, 1e4)):  # 24: vectors of 8
            gen = torch.Generator().manual_seed(dim)
            x = torch.randn(2, 5, 7, dim, generator=gen) * x_scale
            w1, w2 = torch.randn(hidden, dim, generator=gen) * 0.3, torch.randn(dim, hidden, generator=gen) * 0.3
            wd, b1, bd, b2 = (torch.randn(*s, generator=gen) * 0.3 for s in ((hidden, 9), (hidden,), (hidden,), (dim,)))
            out = torch.empty(2, 5, 7, dim)
            conv_ffn_op()(x, w1, b1, wd, bd, w2, b2, out)
            h = F.gelu(x.double() @ w1.double().T + b1.double()).permute(0, 3, 1, 2)
            d = F.conv2d(h, wd.double().view(hidden, 1, 3, 3), bd.double(), padding=1, groups=hidden)
            ref = (F.gelu(d) + h).permute(0, 2, 3, 1) @ w2.double().T + b2.double()
            errors.append((out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
        q, k, v = image_qkv(1, 8, 16, 2, 16, seed=3, scale=1e4)  # scores thousands apart: weights underflow
        table = torch.randn(2, 15, 15, generator=gen)
        out = attend(op, q, k, v, table, 8)
        errors.append((out.double() - attention_reference(q, k, v, table, 8)).abs().max().item())
        from esc_arch.kernels import spectral_mix_op
        for width in (21, 8):  # whole vectors and a partial one; whole vectors only
            signal = torch.randn(2, 3, 10, width, 2, generator=gen)
            rows, cols = torch.randn(10, 3, 4, 7, generator=gen), torch.randn(7, width, generator=gen)
            out = torch.empty(2, 4, 10, width, 2)
            spectral_mix_op()(signal, rows, cols, out)
            ref = checks.spectral_mix_reference(signal, rows, cols)
            errors.append((torch.view_as_complex(out).cdouble() - ref).abs().max().item() / 10)
        for b, h, w, cin, cout in ((1, 9, 11, 64, 64), (2, 4, 3, 16, 24)):  # vectors of 8 and 16 mixed
            for tile in (2, 4):
                errors.append(checks.conv3x3_check(b, h, w, cin, cout, residual=True, tile=tile))
        print('max error', max(errors))
        assert all(e < 2e-5 for e in errors), errors  # a NaN error fails too
    ''')
    tests = os.path.dirname(os.path.abspath(__file__))  # the script imports this module's references
    path = os.pathsep.join(filter(None, [tests, os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, **{ENV_SWITCH: 'avx2'}, PYTHONPATH=path)
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'max error' in result.stdout


def test_a_model_in_channels_last_memory_format_runs_the_fast_path_exactly():
    # model.to(memory_format=torch.channels_last) gave 3x3 weights the Winograd kernel refused
    # ("conv3x3: contiguous float32 CPU tensors only")
    import copy
    for cls in (ESC, ESCFP):
        model = cls(dim=16, pdim=8, kernel_size=13, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                    upscaling_factor=2).eval()
        reference = copy.deepcopy(model).double()
        model = model.to(memory_format=torch.channels_last).deploy()
        x = torch.rand(1, 3, 40, 48)
        with torch.no_grad():
            expected = reference(x.double())
            assert (model(x).double() - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


def test_one_deployed_model_serves_several_threads(op):
    # the per-size spectra cache was evicted while another thread summed it: "dictionary keys
    # changed during iteration" (more sizes than it keeps; a tiny switch interval widens the race)
    import threading
    model = ESC(dim=16, pdim=8, kernel_size=13, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                upscaling_factor=2).eval().deploy()
    inputs = [torch.rand(1, 3, 32, 32 + i) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    errors = []

    def work(first):
        try:
            with torch.no_grad():
                for step in range(12):
                    index = (first * 3 + step) % len(inputs)
                    assert (model(inputs[index]) - expected[index]).abs().max().item() < 1e-5
        except Exception as exc:  # reported below
            errors.append(repr(exc))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run_in_threads(work, 4)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    # disabled() is per thread: another thread inside it does not switch this thread's kernels off
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with disabled():
            inside.set()
            leave.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        assert window_attention_op() is not None
        with disabled():
            assert window_attention_op() is None
        assert window_attention_op() is not None
    finally:
        leave.set()
        holder.join()


def test_a_prebuilt_library_is_loaded_only_if_complete_current_and_of_these_sources(tmp_path, monkeypatch):
    # an interrupted rebuild leaves a library older than its new build.ninja; a changed header is a
    # new digest (the loader itself rebuilds only for changed .cpp files and flags)
    from torch.utils import cpp_extension
    folder = tmp_path / 'build'
    folder.mkdir()
    library = folder / 'lib.so'
    shutil.copy(os.path.realpath(sys.executable), library)  # a complete ELF file (load_library is faked)
    ninja = folder / 'build.ninja'
    ninja.write_text('cflags = -O3 -DESC_KERNELS_DIGEST=0123456789ab\n')
    monkeypatch.setattr(kernels_module, '_library_path', lambda *args: str(library))
    loaded = []
    monkeypatch.setattr(torch.ops, 'load_library', loaded.append)
    os.utime(ninja, (1000, 1000))
    os.utime(library, (2000, 2000))
    assert kernels_module._load_prebuilt('lib', '0123456789ab') and loaded == [str(library)]
    assert not kernels_module._load_prebuilt('lib', 'ba9876543210')  # other sources
    os.utime(library, (500, 500))  # older than build.ninja: a rebuild began and did not finish
    assert not kernels_module._load_prebuilt('lib', '0123456789ab') and len(loaded) == 1
    # the digest covers the headers
    digests = []
    monkeypatch.setattr(cpp_extension, 'load', lambda **kw: digests.append(
        [flag for flag in kw['extra_cflags'] if 'DIGEST' in flag][0]))
    monkeypatch.setattr(kernels_module, '_announce_a_first_build', lambda *args: None)
    monkeypatch.setattr(kernels_module, 'kernel_isa', lambda: 'avx2')
    header = tmp_path / 'extra.h'
    header.write_text('// one\n')
    monkeypatch.setattr(kernels_module, 'HEADERS', [*kernels_module.HEADERS, header])
    assert kernels_module._build() == (True, None)
    header.write_text('// two\n')
    assert kernels_module._build() == (True, None)
    assert len(digests) == 2 and digests[0] != digests[1]
