"""The CUDA paths: the authors' fixtures on the GPU with every attention backend, half precision,
a training step, ``basicsr bench --device cuda``. Skipped where there is no CUDA device (CI);
``benchmarks/run_gpu.sh`` runs them on a lent GPU machine."""
import json
import math

import pytest
import torch
from conftest import load_fixture, randomize_, tiny_config
from test_archs import ARCHS, PARITY

from esc_arch import ESC
from esc_arch.cli import main as cli_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 means float32 here: cuDNN convolutions use TF32 by default (10-bit mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fixture_model(name, attn_type, dtype):
    data = load_fixture(name)
    model = ARCHS[data['type']](**data['config'], attn_type=attn_type)
    model.load_state_dict(data['state_dict'], strict=True)
    model = model.to('cuda', dtype).train(data['mode'] == 'train')
    return model, data


def max_error(model, data, dtype):
    with torch.no_grad():
        out = model(data['input'].to('cuda', dtype))
    assert out.shape == data['output_float64'].shape
    return (out.double().cpu() - data['output_float64']).abs().max().item()


@pytest.mark.parametrize('attn_type', ['naive', 'sdpa', 'flex', 'auto'])
@pytest.mark.parametrize('fixture', PARITY)
def test_parity_float64_on_cuda(fixture, attn_type):
    model, data = fixture_model(fixture, attn_type, torch.float64)
    assert max_error(model, data, torch.float64) <= 1e-6


@pytest.mark.parametrize('attn_type', ['sdpa', 'flex', 'auto'])
@pytest.mark.parametrize('fixture', PARITY)
def test_parity_float32_on_cuda(fixture, attn_type):
    model, data = fixture_model(fixture, attn_type, torch.float32)
    assert max_error(model, data, torch.float32) <= 1e-4


@pytest.mark.parametrize('dtype, tolerance', [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize('attn_type', ['sdpa', 'flex'])
def test_half_precision_on_cuda(dtype, tolerance, attn_type):
    """fp16 keeps 11 bits, bf16 8: the output stays finite and near the float64 reference."""
    name = next(p for p in PARITY if 'esc_x4' in p)
    model, data = fixture_model(name, attn_type, dtype)
    model.eval()
    with torch.no_grad():
        out = model(data['input'].to('cuda', dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    reference = ARCHS[data['type']](**data['config']).double().eval()
    reference.load_state_dict(data['state_dict'], strict=True)
    with torch.no_grad():
        expected = reference(data['input'].double())
    scale = expected.abs().max().item()
    assert (out.double().cpu() - expected).abs().max().item() <= tolerance * max(1.0, scale)


@pytest.mark.parametrize('attn_type', ['sdpa', 'flex'])
def test_training_step_on_cuda_matches_naive(attn_type):
    """Loss and gradients through SDPA / compiled flex equal the written-out attention's."""
    config = tiny_config(kernel_size=13, window_size=8, n_blocks=1)
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1)).cuda()
    grads = {}
    for backend in ('naive', attn_type):
        model = randomize_(ESC(**config, attn_type=backend), scale=0.1).cuda().train()
        loss = model(x).square().mean()
        loss.backward()
        grads[backend] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    (loss_ref, ref), (loss_got, got) = grads['naive'], grads[attn_type]
    assert math.isclose(loss_got, loss_ref, rel_tol=1e-5)
    for g_ref, g_got in zip(ref, got):
        assert (g_got - g_ref).abs().max().item() <= 1e-4 * max(1.0, g_ref.abs().max().item())


def test_bench_on_cuda(tmp_path):
    out = tmp_path / 'records'
    arch = 'ESC:dim=16,pdim=4,kernel_size=13,n_blocks=1,conv_blocks=1,window_size=8,num_heads=2,upscaling_factor=4'
    assert cli_main(['bench', '--arch', arch, '--device', 'cuda', '--dtype', 'fp16', '--lr-size', '24x32',
                     '--runs', '2', '--check', '--out', str(out), '--no-progress']) == 0
    (path,) = out.glob('*.json')
    record = json.loads(path.read_text())
    assert record['device'].startswith('cuda') and record['device_name']
    assert record['dtype'] == 'fp16' and record['output_size'] == [96, 128]
    assert record['peak_memory_mb'] > 0 and len(record['latencies_ms']) == 2
    assert record['attention_backends'] == ['sdpa'] and record['fused_kernel_isa'] is None
    assert 0 < record['check_max_abs_err'] < 0.05
