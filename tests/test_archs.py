"""The ESC family against the authors' fixtures and layouts, plus the behaviour the spec adds."""
import copy
import logging
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from conftest import REFERENCE, load_fixture, randomize_, run_in_threads, tiny_config

from esc_arch import ESC, ESCFP, ConvAttn, ESCReal, WindowAttention
from esc_arch.archs.layers import reflect_pad_to_multiple, relative_position_bias, symmetrize_filter

ARCHS = {'ESC': ESC, 'ESCFP': ESCFP, 'ESCReal': ESCReal}
BACKENDS = ['Naive', 'SDPA', 'Flex', 'auto']
PARITY = sorted(p.name for p in REFERENCE.glob('parity_*.pt'))


def test_parity_fixtures_present():
    assert len(PARITY) >= 2, f'expected parity fixtures in {REFERENCE}'


@pytest.mark.parametrize('attn_type', BACKENDS)
@pytest.mark.parametrize('fixture', PARITY)
def test_parity_float64(fixture, attn_type):
    data = load_fixture(fixture)
    model = ARCHS[data['type']](**data['config'], attn_type=attn_type).double()
    model.load_state_dict(data['state_dict'], strict=True)
    model.train(data['mode'] == 'train')
    with torch.no_grad():
        out = model(data['input'].double())
    assert out.shape == data['output_float64'].shape
    assert (out - data['output_float64']).abs().max().item() <= 1e-6


@pytest.mark.parametrize('fixture', PARITY)
def test_parity_after_deploy(fixture):
    data = load_fixture(fixture)
    model = ARCHS[data['type']](**data['config']).double()
    model.load_state_dict(data['state_dict'], strict=True)
    if data['mode'] != 'eval':
        pytest.skip('deploy is an inference transform')
    model.deploy()
    with torch.no_grad():
        out = model(data['input'].double())
    assert (out - data['output_float64']).abs().max().item() <= 1e-6


def test_every_released_layout(layouts):
    assert len(layouts) == 16
    for name, layout in layouts.items():
        model = ARCHS[layout['type']](**layout['config'])
        state = model.state_dict()
        assert list(state) == list(layout['state_dict']), name
        assert {k: list(v.shape) for k, v in state.items()} == layout['state_dict'], name
        assert sum(p.numel() for p in model.parameters()) == layout['num_params'], name
        random_state = {k: torch.randn(shape) for k, shape in layout['state_dict'].items()}
        model.load_state_dict(random_state, strict=True)
    assert layouts['ESC_DIV2K_X4']['num_params'] == 967_500


def test_registry_builds_all_archs():
    for name in ['ESC', 'ESCFP', 'ESCReal', 'ConvAttn', 'WindowAttention']:
        assert ARCH_REGISTRY.get(name) is not None
    net = build_network({'type': 'ESC', **tiny_config()})
    assert isinstance(net, ESC)
    assert net(torch.rand(1, 3, 9, 11)).shape == (1, 3, 18, 22)


@pytest.mark.parametrize('order', ['import esc_arch, basicsr', 'import basicsr, esc_arch'])
def test_import_order(order):
    result = subprocess.run([sys.executable, '-c', f'{order}; print(basicsr.__version__)'], capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]


def test_relative_position_bias_is_key_minus_query():
    window, heads = 3, 2
    table = torch.randn(heads, (2 * window - 1)**2, dtype=torch.float64)
    bias = relative_position_bias(table, window)
    for q in range(window * window):
        for k in range(window * window):
            (qh, qw), (kh, kw) = divmod(q, window), divmod(k, window)
            index = (kh - qh + window - 1) * (2 * window - 1) + (kw - qw + window - 1)
            assert torch.equal(bias[:, q, k], table[:, index])


def test_attn_type_values():
    for value in ['naive', 'NAIVE', 'Sdpa', 'flex', 'AUTO']:
        ESC(**tiny_config(), attn_type=value)
    with pytest.raises(ValueError, match=r"attn_type must be one of auto, naive, sdpa, flex or FlashBias \(any case\), "
                                         r"got 'fast'$"):
        ESC(**tiny_config(), attn_type='fast')
    with pytest.raises(ValueError, match=r"flashbias_rank \(16\) is for attn_type FlashBias only, got attn_type 'fl"):
        ESC(**tiny_config(), attn_type='flex', flashbias_rank=16)  # the authors' code ignores it: a table model
    with pytest.raises(ValueError, match='got None'):
        ESC(**tiny_config(), attn_type=None)  # was AttributeError: 'NoneType' object has no attribute 'lower'


@pytest.mark.parametrize('arch', ['ESC', 'ESCFP', 'ESCReal'])
@pytest.mark.parametrize('training', [False, True])
def test_backends_agree(arch, training):
    config = tiny_config(upscaling_factor=4) if arch == 'ESCReal' else tiny_config()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 10, 7, dtype=torch.float64)
    outputs = []
    for backend in ['naive', 'sdpa', 'flex']:
        model = randomize_(ARCHS[arch](**config, attn_type=backend)).double().train(training)
        with torch.no_grad():
            outputs.append(model(x))
    for out in outputs[1:]:
        assert (out - outputs[0]).abs().max().item() < 1e-10


@pytest.mark.parametrize('arch', ['ESC', 'ESCFP', 'ESCReal'])
@pytest.mark.parametrize('training', [False, True])
def test_batch_equals_single(arch, training):
    config = tiny_config(upscaling_factor=4) if arch == 'ESCReal' else tiny_config()
    model = randomize_(ARCHS[arch](**config)).double().train(training)
    torch.manual_seed(1)
    x = torch.rand(3, 3, 9, 13, dtype=torch.float64)
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert (batched - singles).abs().max().item() < 1e-10
    # the dynamic kernels really differ per sample, so this is not vacuous
    assert (singles[0] - singles[1]).abs().max() > 1e-3


def test_train_and_eval_compute_the_same():
    model = randomize_(ESC(**tiny_config(use_ln=True))).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.train()(x), model.eval()(x), atol=1e-12, rtol=0)


def test_use_ln_adds_layer_norms(layouts):
    with_ln = ESC(**tiny_config(use_ln=True))
    without = ESC(**tiny_config())
    extra = set(with_ln.state_dict()) - set(without.state_dict())
    assert extra == {f'blocks.0.lns.{i}.{p}' for i in range(2) for p in ('weight', 'bias')}
    model = randomize_(with_ln).double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].lns[0].weight.mul_(2)
        assert (model(x) - before).abs().max() > 1e-6


@pytest.mark.parametrize('kernel_size', [5, 9, 13, 15])
@pytest.mark.parametrize('arch', ['ESC', 'ESCFP'])
def test_other_kernel_sizes(arch, kernel_size):
    model = randomize_(ARCHS[arch](**tiny_config(kernel_size=kernel_size))).double().eval()
    x = torch.rand(1, 3, 17, 19, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 3, 34, 38)
    # a shift-equivariant check that the whole K x K support is used: an impulse far from the
    # border reaches exactly K//2 pixels away in the large-kernel convolution
    attn = model.blocks[0].pconvs[0]
    impulse = torch.zeros(1, 16, 31, 31, dtype=torch.float64)
    impulse[0, 0, 15, 15] = 1
    filters = model.large_kernel_filters()
    response = attn.plk(impulse[:, :4], *filters)[0].abs().sum(0)
    rows = response.sum(1).nonzero().flatten()
    assert rows.min().item() == 15 - kernel_size // 2 and rows.max().item() == 15 + kernel_size // 2


@pytest.mark.parametrize('kernel_size', [1, 3])
@pytest.mark.parametrize('arch', ['ESC', 'ESCFP'])
def test_kernels_smaller_than_the_dynamic_3x3_on_the_fast_path(arch, kernel_size):
    # ESC-FP's kernel of 1 keeps only the centre of its dynamic 3x3 (its sum pads it by -1); the
    # CPU in-place path added all of it (0.47 off): it runs the plain path there
    config = tiny_config(kernel_size=kernel_size, dim=32, pdim=8, window_size=16)  # pdim 8: the CPU kernels' path
    model = randomize_(ARCHS[arch](**config), scale=0.05).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        fast = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    assert (fast.double() - exact).abs().max().item() < 1e-5


def test_esc_real_on_an_input_too_small_for_its_skip_branch_says_so():
    model = ESCReal(**tiny_config(upscaling_factor=4)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 4, 5)).shape == (1, 3, 16, 20)
        with pytest.raises(ValueError, match='ESCReal needs inputs of at least 4x4 pixels .* got 3x5'):
            model(torch.rand(1, 3, 3, 5))


def test_symmetrised_filter_is_dihedral_invariant():
    kernel = torch.randn(4, 4, 7, 7, dtype=torch.float64)
    sym = symmetrize_filter(kernel)
    for image in [sym.flip(-1), sym.flip(-2), torch.rot90(sym, 1, (-2, -1)), sym.transpose(-1, -2)]:
        assert torch.allclose(image, sym)
    assert torch.allclose(symmetrize_filter(sym), sym)


def test_cross_scale_loading_resamples_to_img(caplog):
    source = randomize_(ESC(**tiny_config(upscaling_factor=2)))
    state = source.state_dict()
    with torch.no_grad():  # a constant sub-pixel grid must stay constant after bilinear resampling
        state['to_img.bias'] = torch.arange(3.).repeat_interleave(4)
    target = ESC(**tiny_config(upscaling_factor=4))
    with caplog.at_level(logging.INFO, logger='basicsr'):
        target.load_state_dict(state, strict=True)
    assert sum('x2 to x4' in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(target.to_img.bias, torch.arange(3.).repeat_interleave(16))
    # independent check of the weight: bilinear resize of each (2,2) grid, align_corners=False
    weight = state['to_img.weight']  # (3*4, C, 3, 3)
    c = weight.shape[1]
    grids = weight.view(3, 2, 2, c * 9).permute(0, 3, 1, 2).reshape(3 * c * 9, 1, 2, 2)
    expected = F.interpolate(grids.double(), size=(4, 4), mode='bilinear', align_corners=False).float()
    expected = expected.view(3, c * 9, 4, 4).permute(0, 2, 3, 1).reshape(48, c, 3, 3)
    assert torch.allclose(target.to_img.weight, expected, atol=1e-6)
    assert not torch.equal(state['to_img.weight'][:12], target.to_img.weight[:12])
    assert source.to_img.weight.shape[0] == 12  # the caller's state dict is untouched
    assert state['to_img.weight'].shape[0] == 12


def test_cross_scale_loading_escfp():
    state = ESCFP(**tiny_config(upscaling_factor=2)).state_dict()
    target = ESCFP(**tiny_config(upscaling_factor=3))
    target.load_state_dict(state, strict=True)
    assert target.to_img.weight.shape[0] == 27


def test_deploy_is_exact_and_reversible():
    model = randomize_(ESC(**tiny_config(upscaling_factor=3))).double().eval()
    x = torch.rand(2, 3, 11, 6, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        model.deploy()
        assert model.deployed
        deployed = model(x)
        assert (deployed - reference).abs().max().item() <= 1e-6
        fresh = ESC(**tiny_config(upscaling_factor=3)).double().eval()
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert (fresh(x) - reference).abs().max().item() <= 1e-6
    model.train()
    assert not model.deployed and model.blocks[0].attn.kept_bias is None


def test_eval_keeps_the_attention_bias_until_the_table_changes():
    model = randomize_(ESC(**tiny_config())).double().eval()
    attn = model.blocks[0].attn
    x = torch.rand(1, 3, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        cached = attn.kept_bias
        model(x)
        assert attn.kept_bias is cached  # not rebuilt per forward
        for param in model.parameters():
            param.mul_(0.9)  # an in-place update, as an optimizer or EMA step makes
        updated = model(x)
    assert attn.kept_bias is not cached
    fresh = ESC(**tiny_config()).double()
    fresh.load_state_dict(model.state_dict())
    reference = fresh.eval()(x).detach()  # autograd on: the bias is built in the graph
    assert (updated - reference).abs().max().item() <= 1e-12
    model.float()
    assert attn.kept_bias is None
    attn.max_kept_bias_bytes = 0  # too large to keep un-deployed (as ESC-XL's) ...
    with torch.no_grad():
        model(x.float())
        assert attn.kept_bias is None
        model.deploy()  # ... but kept once deployed, also after a cast
        model(x.float())  # (window 4: SDPA, which builds it; the fused CPU kernel never does)
        assert attn.kept_bias is not None
        model.double()(x)
        assert attn.kept_bias is not None and attn.kept_bias.dtype == torch.float64


def test_model_built_and_loaded_under_inference_mode():
    """Parameters made under inference_mode have no version counter: such a model still runs,
    and sees in-place changes to its tables (it does not keep the bias then)."""
    state = randomize_(ESC(**tiny_config())).state_dict()
    x = torch.rand(1, 3, 9, 10, dtype=torch.float64)
    expected = ESC(**tiny_config()).double().eval()
    expected.load_state_dict(state)
    with torch.inference_mode():
        model = ESC(**tiny_config())
        model.load_state_dict(state)
        model = model.double().eval()
        assert (model(x) - expected(x).detach()).abs().max().item() <= 1e-12
        for param in model.parameters():
            param.mul_(0.9)
        changed = model(x)
    with torch.no_grad():
        for param in expected.parameters():
            param.mul_(0.9)
        assert (changed - expected(x)).abs().max().item() <= 1e-12


@pytest.mark.parametrize('deploy', [False, True])
def test_a_frozen_model_run_under_inference_mode_backpropagates_to_its_input(deploy):
    # the attention bias kept by an inference_mode forward is an inference tensor: a later forward of
    # the frozen model for a gradient of its input (a loss through it) failed in SDPA's backward
    model = randomize_(ESC(**tiny_config())).double().eval().requires_grad_(False)
    if deploy:
        model.deploy()
    x = torch.rand(1, 3, 9, 10, dtype=torch.float64)
    with torch.inference_mode():
        expected = model(x)
    x.requires_grad_()
    out = model(x)
    out.sum().backward()
    assert (out.detach() - expected).abs().max().item() <= 1e-12 and x.grad.abs().sum().item() > 0


def test_deployment_flag_and_loading_after_deploy():
    reference = randomize_(ESC(**tiny_config()), seed=3).double().eval()
    x = torch.rand(1, 3, 7, 9, dtype=torch.float64)
    model = ESC(**tiny_config(), deployment=True).double().eval()  # the authors' test-option key
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-12
        assert model.deployed
        other = randomize_(ESC(**tiny_config()), seed=4).double().eval()
        model.load_state_dict(other.state_dict())  # raw (unsymmetrised) weights into a deployed model
        assert not model.deployed
        assert (model(x) - other(x)).abs().max().item() <= 1e-12


def test_tiny_inputs_smaller_than_a_window():
    model = randomize_(ESC(**tiny_config(window_size=8))).eval()
    for h, w in [(1, 1), (2, 3), (3, 8), (1, 17)]:
        with torch.no_grad():
            assert model(torch.rand(1, 3, h, w)).shape == (1, 3, 2 * h, 2 * w)


def test_reflect_pad_matches_torch_when_torch_can():
    x = torch.rand(1, 2, 7, 5)
    assert torch.equal(reflect_pad_to_multiple(x, 8), F.pad(x, (0, 3, 0, 1), mode='reflect'))
    y = reflect_pad_to_multiple(torch.rand(1, 1, 3, 2), 8)
    assert y.shape[-2:] == (8, 8)


def test_standalone_blocks_train():
    attn = ConvAttn(dim=8, pdim=4, kernel_size=5)
    with torch.no_grad():
        attn.plk.dwc_proj[-1].weight.normal_()
    window = WindowAttention(dim=8, window_size=4, num_heads=2)
    x = torch.rand(2, 8, 6, 10, requires_grad=True)
    out = window(attn(x))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert attn.plk_filter.grad.abs().sum() > 0 and window.relative_position_bias.grad.abs().sum() > 0
    assert attn.plk.dwc_proj[1].weight.grad.abs().sum() > 0
    assert ARCH_REGISTRY.get('ConvAttn') is ConvAttn


def test_escreal_rejects_other_scales():
    with pytest.raises(ValueError, match='upscaling_factor 4'):
        ESCReal(**tiny_config(upscaling_factor=2))


def test_the_authors_use_dysample_option_builds_the_released_layout_only():
    # the authors' ESCReal takes use_dysample (default false): "unknown option" refused their files
    config = tiny_config(upscaling_factor=4)
    plain = ESCReal(**config).state_dict()
    assert {k: v.shape for k, v in ESCReal(**config, use_dysample=False).state_dict().items()} == {
        k: v.shape for k, v in plain.items()}
    with pytest.raises(ValueError, match='use_dysample: true .* is not supported'):
        ESCReal(**config, use_dysample=True)
    from esc_arch.loading import CheckpointError, infer_config
    with pytest.raises(CheckpointError, match='ESCReal checkpoint with a DySample upsampler'):
        infer_config({**plain, 'to_img.init_pos': torch.zeros(1, 32, 1, 1)})


def test_float32_close_to_float64():
    data = load_fixture(PARITY[0])
    model = ARCHS[data['type']](**data['config'])
    model.load_state_dict(data['state_dict'], strict=True)
    model.train(data['mode'] == 'train')
    with torch.no_grad():
        out = model(data['input'].float())
    assert math.isfinite(out.sum().item())
    assert (out.double() - data['output_float64']).abs().max().item() < 1e-4


def test_fft_large_kernel_matches_direct():
    from esc_arch.archs.layers import LargeKernel
    torch.manual_seed(0)
    weight = torch.randn(6, 6, 13, 13, dtype=torch.float64)
    lk = LargeKernel(weight)
    for h, w in [(40, 40), (37, 53), (64, 33)]:
        x = torch.randn(2, 6, h, w, dtype=torch.float64)
        assert lk.use_fft(x)
        direct = F.conv2d(x, weight, padding=6)
        assert (lk(x) - direct).abs().max().item() < 1e-10
    assert len(lk._spectra) == 3  # one spectrum per size, reused
    depthwise = LargeKernel(torch.randn(6, 1, 13, 13, dtype=torch.float64), depthwise=True)  # ESC-FP's lk_spatial
    for h, w in [(40, 40), (37, 53)]:
        x = torch.randn(2, 6, h, w, dtype=torch.float64)
        assert depthwise.use_fft(x)
        direct = F.conv2d(x, depthwise.weight, padding=6, groups=6)
        with torch.no_grad():
            assert (depthwise(x) - direct).abs().max().item() < 1e-10
    x = torch.randn(1, 6, 40, 40, requires_grad=True)
    assert not LargeKernel(weight.float()).use_fft(x)  # training keeps the direct convolution


def test_a_filter_symmetric_in_one_axis_only_is_not_factored():
    # the factored spectrum needs mirror symmetry in both axes; one axis alone gave errors of ~40
    from esc_arch.archs.layers import LargeKernel
    torch.manual_seed(3)
    base = torch.randn(4, 4, 13, 13)
    x = torch.randn(1, 4, 40, 40)
    for axis in (-1, -2):
        weight = (base + base.flip(axis)) / 2
        lk = LargeKernel(weight)
        with torch.no_grad():
            out = lk(x)
        assert lk.use_fft(x) and not lk._factorable()
        assert (out - F.conv2d(x, weight, padding=6)).abs().max().item() < 1e-4
    both = LargeKernel(symmetrize_filter(base))
    assert both._factorable()


@pytest.mark.parametrize('arch', ['ESC', 'ESCFP'])
def test_half_precision_cpu_inference_with_the_13x13_kernel(arch):
    # the FFT path is float32/float64 only: bf16/fp16 take the direct convolution (the FFT has no
    # half-precision CPU kernel: NotImplementedError)
    model = randomize_(ARCHS[arch](**tiny_config(kernel_size=13)), scale=0.1).eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
        for dtype, tolerance in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            out = copy.deepcopy(model).to(dtype)(x.to(dtype))
            assert out.dtype == dtype and (out.float() - expected).abs().max().item() < tolerance, dtype


def test_the_authors_convert_is_deploy():
    model = randomize_(ESC(**tiny_config(kernel_size=7)), scale=0.1).eval()
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        before = model(x)
        assert model.convert() is model and model.deployed
        assert torch.allclose(model(x), before, atol=1e-6)
        assert torch.allclose(model.plk_filter, symmetrize_filter(model.plk_filter), atol=1e-7)  # folded, as theirs


def test_eval_keeps_a_deployed_model_deployed():
    # BasicSR calls eval() before every validation: it must not drop the kept filter and spectra
    model = ESC(**tiny_config()).deploy()
    with torch.no_grad():
        model(torch.rand(1, 3, 12, 10))
    kept = model._kept_kernel
    assert kept is not None and model.eval().deployed and model._kept_kernel is kept
    assert not model.train().deployed and model._kept_kernel is None


def test_auto_attention_with_a_window_the_kernel_does_not_take():
    # the fused CPU kernel takes windows that are multiples of 8; a window of 4 in float32
    # inference goes through SDPA under auto, with the naive path's numbers
    attn = WindowAttention(32, 4, 2)
    x = torch.randn(2, 32, 13, 10)
    with torch.no_grad():
        auto = attn(x)
        backend = attn.last_backend
        attn.attn_type = 'naive'
        naive = attn(x)
    assert backend == 'sdpa' and (auto - naive).abs().max().item() < 1e-5


def test_factored_spectrum_equals_the_fft_of_the_centred_filter():
    from esc_arch.archs.layers import _factored_spectrum
    torch.manual_seed(2)
    for k, size in ((13, (40, 36)), (7, (21, 25)), (3, (8, 9))):
        weight = symmetrize_filter(torch.randn(3, 4, k, k, dtype=torch.float64))
        rows, cols = _factored_spectrum(weight, size)
        assert rows.shape == (size[0], 3, 4, k // 2 + 1) and cols.shape == (k // 2 + 1, size[1] // 2 + 1)
        centred = F.pad(weight, (0, size[1] - k, 0, size[0] - k)).roll((-(k // 2), -(k // 2)), (-2, -1))
        expected = torch.fft.rfft2(centred)
        assert expected.imag.abs().max().item() < 1e-12  # real, as the factors assume
        assert (torch.einsum('uiot,tv->iouv', rows, cols) - expected.real).abs().max().item() < 1e-12


def test_large_kernel_spectra_are_kept_least_recently_used_first():
    from esc_arch.archs.layers import LargeKernel
    lk = LargeKernel(torch.randn(2, 2, 7, 7, dtype=torch.float64))
    lk.max_spectra = 2
    inputs = {size: torch.randn(1, 2, size, size, dtype=torch.float64) for size in (40, 44, 50)}  # FFT 48, 50, 56
    with torch.no_grad():
        lk(inputs[40]), lk(inputs[44])
        first = lk._spectra[next(iter(lk._spectra))]
        lk(inputs[40])  # reused (same tensor), and now the most recent
        assert lk._spectra[next(reversed(lk._spectra))] is first
        lk(inputs[50])  # evicts 44's, the least recently used
        assert [key[0] for key in lk._spectra] == [(48, 48), (56, 56)]
        lk.max_spectra_bytes = 1  # over budget: only the newest stays
        lk(inputs[44])
        assert [key[0] for key in lk._spectra] == [(50, 50)]
        assert (lk(inputs[44]) - F.conv2d(inputs[44], lk.weight, padding=3)).abs().max().item() < 1e-10


@pytest.mark.parametrize('arch', ['ESC', 'ESCFP'])  # the dense shared filter; ESC-FP's depthwise lk_spatial
def test_deployed_model_keeps_its_spectra_across_images_until_changed(arch):
    model = randomize_(ARCHS[arch](**tiny_config(kernel_size=13)), scale=0.1).eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        model.deploy()
        first = model(x)
        cached = model.large_kernel_filters()[-1]
        assert len(cached._spectra) == 1
        assert torch.equal(model(x), first) and model.large_kernel_filters()[-1] is cached
        model.double()  # new dtype: spectra are recomputed
        assert model.large_kernel_filters()[-1] is not cached
        assert (model(x.double()) - first.double()).abs().max().item() < 1e-4
    model.train()
    assert model._kept_kernel is None


# float32: the FFT paths; half types against an undeployed model of their own type (their error
# against float64, ~2e-2, would hide a stale filter, off by ~4e-2)
@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 1e-3),
                                              (torch.float16, 1e-3)])
@pytest.mark.parametrize('arch', ['ESC', 'ESCFP', 'ESCReal'])
def test_a_deployed_model_follows_writes_through_data(arch, dtype, tolerance, monkeypatch):
    # BasicSR's EMA updates its EMA model (eval: deployed on first use with deployment: true)
    # through .data; the kept symmetrised filter and spectra must follow, as an undeployed model does
    from esc_arch.archs import layers
    monkeypatch.setattr(layers, 'FFT_MIN_PIXELS', 0)  # the kept spectra even on a tiny image
    config = tiny_config(kernel_size=13, upscaling_factor=4 if arch == 'ESCReal' else 2)
    model = randomize_(ARCHS[arch](**config, deployment=True), scale=0.1).to(dtype).eval()
    x = torch.rand(1, 3, 24, 20, dtype=dtype)
    with torch.no_grad():
        model(x)
        assert model.deployed
        online = randomize_(ARCHS[arch](**config), seed=1, scale=0.1).to(dtype)
        for ema, new in zip(model.parameters(), online.parameters()):
            ema.data.mul_(0.5).add_(new.data, alpha=0.5)  # BasicSR's model_ema, decay 0.5
        reference = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float64
        expected = ARCHS[arch](**config).to(reference).eval()
        expected.load_state_dict(model.state_dict())
        assert (model(x).double() - expected(x.to(reference)).double()).abs().max().item() < tolerance
        written = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()  # undeployed: training goes on from the written (not the first deployed) weights
    for name, param in model.named_parameters():
        if name == 'plk_filter':  # kept folded while deployed: the same filter up to symmetry
            assert torch.allclose(symmetrize_filter(param), symmetrize_filter(written[name]), atol=tolerance * 1e-3)
        else:
            assert torch.equal(param, written[name]), name


@pytest.mark.parametrize('fixture', PARITY)
def test_parity_through_the_cpu_fast_paths(fixture, monkeypatch):
    from esc_arch.archs import layers
    monkeypatch.setattr(layers, 'FFT_MIN_PIXELS', 0)  # FFT convolutions at any size
    data = load_fixture(fixture)
    model = ARCHS[data['type']](**data['config']).double().eval()
    model.load_state_dict(data['state_dict'], strict=True)
    with torch.no_grad():
        out = model(data['input'].double())
    assert (out - data['output_float64']).abs().max().item() <= 1e-6


@pytest.mark.parametrize('fixture', PARITY)
def test_parity_in_both_memory_layouts(fixture):
    """CPU inference runs channels-last, autograd runs NCHW: both give the authors' output."""
    data = load_fixture(fixture)
    model = ARCHS[data['type']](**data['config']).double()
    model.load_state_dict(data['state_dict'], strict=True)
    model.train(data['mode'] == 'train')
    layouts = []
    model.blocks[0].register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = data['input'].double()
    with torch.no_grad():
        fast = model(x)
    slow = model(x).detach()
    assert layouts == [True, False]
    for out in (fast, slow):
        assert out.is_contiguous()
        assert (out - data['output_float64']).abs().max().item() <= 1e-6


@pytest.mark.parametrize('arch', ['ESC', 'ESCFP', 'ESCReal'])
@pytest.mark.parametrize('batch', [1, 2])
def test_inference_paths_match_training_path_on_large_input(arch, batch):
    config = tiny_config(kernel_size=13, window_size=8, upscaling_factor=4 if arch == 'ESCReal' else 2)
    model = randomize_(ARCHS[arch](**config), scale=0.1).double()
    x = torch.rand(batch, 3, 48, 40, dtype=torch.float64)
    with torch.no_grad():
        fast = model.eval()(x)  # channels-last, FFT large kernels, in-place ConvAttn/GELU/adds
    slow = model.train()(x.requires_grad_())  # NCHW, direct convolution, autograd-safe ops
    assert (fast - slow.detach()).abs().max().item() < 1e-9


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_to_channels_first_is_a_plain_transpose(dtype):
    from esc_arch.archs.layers import to_channels_first
    for shape in [(1, 37, 45, 64), (3, 50, 51, 16), (2, 4, 4, 3)]:  # ragged chunks, many chunks, one chunk
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            out = to_channels_first(x)
        assert out.is_contiguous() and torch.equal(out, x.permute(0, 3, 1, 2))
    x = torch.randn(1, 40, 40, 8, requires_grad=True)
    to_channels_first(x).sum().backward()  # autograd keeps the plain copy
    assert torch.equal(x.grad, torch.ones_like(x))


def _window_attention_reference(module, x):
    """Swin-style window attention written out: pad, attend within every whole window, crop."""
    b, dim, h, w = x.shape
    ws, heads = module.window_size, module.num_heads
    xp = reflect_pad_to_multiple(x, ws)
    qkv = F.conv2d(xp, module.to_qkv.weight, module.to_qkv.bias)
    if module.flashbias:  # the bias is the product of the two factors
        bias = module.flashbias_q @ module.flashbias_k.transpose(-2, -1)
    else:
        bias = relative_position_bias(module.relative_position_bias, ws)
    out = torch.zeros_like(xp)
    for i in range(0, xp.shape[-2], ws):
        for j in range(0, xp.shape[-1], ws):
            q, k, v = qkv[..., i:i + ws, j:j + ws].reshape(b, 3, heads, dim // heads, ws * ws).unbind(1)
            attn = (q.transpose(-2, -1) @ k / math.sqrt(dim // heads) + bias).softmax(-1)  # (b, heads, N, N)
            out[..., i:i + ws, j:j + ws] = (v @ attn.transpose(-2, -1)).reshape(b, dim, ws, ws)
    return F.conv2d(out, module.to_out.weight, module.to_out.bias)[..., :h, :w]


@pytest.mark.parametrize('flashbias', [False, True])
@pytest.mark.parametrize('backend', ['naive', 'sdpa', 'flex', 'auto'])
def test_window_attention_matches_written_out_reference(backend, flashbias):
    # sizes: whole windows, bottom edge, right edge, both, smaller than one window
    window = WindowAttention(dim=8, window_size=4, num_heads=2, attn_type='FlashBias' if flashbias else backend,
                             flashbias_rank=5 if flashbias else None)
    window.attn_type = backend  # a FlashBias layer keeps its factors whatever the backend (set_attn_type)
    window = randomize_(window, scale=0.5).double()
    bias_params = list(window.bias_parameters())
    for size in [(8, 12), (7, 12), (8, 10), (7, 9), (3, 2), (5, 4)]:
        x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
        out = window(x)
        ref = _window_attention_reference(window, x)
        assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-12, size
        with torch.no_grad():  # the inference paths (the kept dense bias)
            assert (window(x) - ref).abs().max().item() < 1e-12, size
        grad_out = torch.randn_like(ref)
        grads = torch.autograd.grad(out, [x, *bias_params], grad_out)
        ref_grads = torch.autograd.grad(ref, [x, *bias_params], grad_out)
        assert all(g.abs().max() > 0 for g in grads[1:]), size  # every bias parameter learns
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max().item() < 1e-10, size


def test_window_attention_norm_argument_equals_norm_first():
    from esc_arch.archs.layers import LayerNorm2d
    torch.manual_seed(0)
    window = WindowAttention(dim=8, window_size=4, num_heads=2).double()
    norm = randomize_(LayerNorm2d(8), scale=0.5).double()
    x = torch.randn(2, 8, 7, 10, dtype=torch.float64)  # padded to 8 x 12 inside
    with torch.no_grad():
        assert (window(x, norm=norm) - window(norm(x))).abs().max().item() < 1e-12


def test_standalone_conv_attn_leaves_input_alone():
    attn = ConvAttn(dim=8, pdim=4, kernel_size=5).eval()
    x = torch.rand(1, 8, 40, 40)
    before = x.clone()
    with torch.no_grad():
        attn(x)
    assert torch.equal(x, before)


def test_fft_per_sample_depthwise_matches_grouped_conv():
    from esc_arch.archs import layers
    x = torch.randn(2, 4, 37, 45, dtype=torch.float64)
    kernel = torch.randn(8, 1, 13, 13, dtype=torch.float64)
    assert layers.use_fft(x, kernel)
    grouped = F.conv2d(x.reshape(1, 8, 37, 45), kernel, padding=6, groups=8).view(2, 4, 37, 45)
    assert (layers.per_sample_depthwise(x, kernel) - grouped).abs().max().item() < 1e-10
    assert not layers.use_fft(x, kernel[..., 5:8, 5:8])  # small kernels stay direct


def test_traceable_depthwise_matches_grouped_conv(monkeypatch):
    from esc_arch.archs import layers
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    kernel = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    grouped = layers.per_sample_depthwise(x, kernel)
    monkeypatch.setattr(layers, 'tracing', lambda: True)
    assert torch.allclose(layers.per_sample_depthwise(x, kernel), grouped, atol=1e-12)
    big = torch.randn(1, 1, 13, 13, dtype=torch.float64)
    assert not layers.LargeKernel(big).use_fft(torch.randn(1, 1, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize('kernel_size, channels_last', [(1, True), (3, True), (3, False)])
def test_conv_accumulate_adds_into_the_residual_at_inference(kernel_size, channels_last, monkeypatch):
    """residual + conv(x): at channels-last CPU inference oneDNN writes it into residual itself
    (where PyTorch's build has the operator; a 1x1 in the AVX2 build: the CPU kernels' conv1x1);
    otherwise a plain add. Same values either way."""
    import esc_arch.archs.layers as layers
    from esc_arch.archs.layers import conv_accumulate
    from esc_arch.kernels import conv1x1_preferred, onednn_conv_add_op
    calls, fused = [], onednn_conv_add_op()
    if fused is not None:
        monkeypatch.setattr(layers, 'onednn_conv_add_op', lambda: lambda *a: calls.append(1) or fused(*a))
    conv = torch.nn.Conv2d(8, 8, kernel_size, padding=kernel_size // 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 9, 11).contiguous(memory_format=fmt)
    residual = torch.randn(2, 8, 9, 11).contiguous(memory_format=fmt)
    expected = residual.double() + F.conv2d(x.double(), conv.weight.double(), conv.bias.double(),
                                            padding=kernel_size // 2)
    with torch.no_grad():
        kept = residual.clone()
        out = conv_accumulate(residual, conv, x)
    assert (out.double() - expected).abs().max().item() < 1e-5
    assert out.data_ptr() == residual.data_ptr()  # a temporary of the caller's: overwritten
    if fused is not None:  # the fused operator only on channels-last maps
        assert len(calls) == (channels_last and not (kernel_size == 1 and conv1x1_preferred()))
    grad_out = conv_accumulate(kept, conv, x)  # autograd on: a new tensor, residual untouched
    assert grad_out.requires_grad and grad_out.data_ptr() != kept.data_ptr()
    assert (grad_out.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_pixel_shuffle_and_repeat_channels_in_both_layouts(scale):
    from esc_arch.archs.layers import pixel_shuffle, repeat_channels
    x = torch.rand(2, 3 * scale * scale, 5, 7, dtype=torch.float64)
    expected = F.pixel_shuffle(x, scale)
    image = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        out = pixel_shuffle(y, scale)
        assert out.is_contiguous() and torch.equal(out, expected)
        repeated = repeat_channels(image, scale * scale, like=y)
        assert torch.equal(repeated, torch.repeat_interleave(image, scale * scale, dim=1))
        assert repeated.is_contiguous(memory_format=layout)


@pytest.mark.parametrize('shape', [(1, 16, 1, 20), (1, 16, 20, 1), (1, 16, 1, 9), (3, 16, 1, 50)])
def test_one_pixel_axes_pad_alike_on_every_path(shape):
    # a 1-pixel axis is replicated, the other one still reflected: the fused kernel's position
    # maps and the padded copy of SDPA/naive/training agree (they differed by up to 1.2)
    torch.manual_seed(0)
    layer = randomize_(WindowAttention(16, 8, 2)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        fused = layer(x)
        assert layer.last_backend == 'fused'
        layer.attn_type = 'sdpa'
        assert (fused - layer(x)).abs().max().item() < 1e-5
        ref = layer.double()(x.double())
    assert (fused.double() - ref).abs().max().item() < 1e-5
    padded = reflect_pad_to_multiple(torch.arange(20.).view(1, 1, 1, 20), 8)[0, 0, 0]
    assert padded[18:].tolist() == [18, 19, 18, 17, 16, 15]  # still reflected along the 20 pixels


@pytest.mark.parametrize('attn_type, written', [('sdpa', 'relative_position_bias'), ('FlashBias', 'flashbias_k'),
                                                 ('FlashBias', 'flashbias_q')])
def test_dense_bias_follows_writes_through_data(attn_type, written):
    # BasicSR's EMA writes parameters through .data, which bumps no version counter
    layer = WindowAttention(16, 8, 2, attn_type=attn_type).eval()
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        before = layer(x)
        param = getattr(layer, written)
        param.data.add_(torch.randn_like(param) * 0.1)
        after = layer(x)
        fresh = WindowAttention(16, 8, 2, attn_type=attn_type).eval()
        fresh.load_state_dict(layer.state_dict())
        assert (after - before).abs().max().item() > 1e-3
        assert torch.equal(after, fresh(x))


def test_flex_on_cpu_trains_when_only_the_weights_need_grad():
    layer = WindowAttention(16, 8, 2, attn_type='flex').train()
    layer(torch.randn(2, 16, 12, 20)).square().sum().backward()  # flex has no CPU backward: SDPA
    assert layer.last_backend == 'sdpa' and layer.to_qkv.weight.grad is not None


def test_deploy_then_cast_is_the_cast_then_deploy():
    # deploy() keeps the trained filter aside: a later .double() symmetrises it in float64 (it was
    # 2e-9 off from widening the float32-rounded symmetric filter), undeploy() restores it
    config = dict(dim=16, pdim=8, kernel_size=13, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                  upscaling_factor=2)
    model = randomize_(ESC(**config)).eval()
    trained = model.plk_filter.detach().clone()
    x = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        expected = ESC(**config).double().eval()
        expected.load_state_dict(model.state_dict())
        expected = expected.deploy()(x)
        assert (model.deploy().double()(x) - expected).abs().max().item() < 1e-13
    model.train()
    assert torch.equal(model.plk_filter.float(), trained)
    loaded = ESC(**config).eval().deploy()
    loaded.load_state_dict(ESC(**config).state_dict())
    loaded.train()  # undeploying after a load keeps the loaded filter
    assert not torch.equal(loaded.plk_filter, trained)


def test_a_deployed_model_written_then_cast_casts_the_written_filter():
    # a cast of a deployed model symmetrises its kept trained filter anew; written since (EMA through
    # .data) without a forward in between, that was the filter of before the write (2.2 off here)
    model = randomize_(ESC(**tiny_config())).eval().deploy()
    written = randomize_(ESC(**tiny_config()), seed=5)
    with torch.no_grad():
        for param, new in zip(model.parameters(), written.parameters()):
            param.data.copy_(new.data)
    expected = ESC(**tiny_config()).double().eval()
    expected.load_state_dict(written.state_dict())
    x = torch.rand(1, 3, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        assert (model.double()(x) - expected(x)).abs().max().item() < 1e-12
    model.train()
    assert torch.equal(model.plk_filter, written.plk_filter.double())


def test_gradients_through_a_deployed_model_are_the_undeployed_ones():
    # a deployed ESC keeps the symmetrised filter; backpropagating through it in eval mode (e.g. an
    # optimiser on a deployed model) gave the raw gradient, not its projection on symmetric filters
    # (2.3 off here), so Adam's statistics drifted from the undeployed model's
    for cls in (ESC, ESCFP):
        plain = randomize_(cls(**tiny_config(window_size=8))).double().eval()
        deployed = cls(**tiny_config(window_size=8)).double()
        deployed.load_state_dict(plain.state_dict())
        deployed = deployed.eval().deploy()
        x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
        optimizers = [torch.optim.Adam(net.parameters(), lr=1e-2) for net in (plain, deployed)]
        for _ in range(2):  # the second step runs on the re-symmetrised filter of a changed deployed model
            for net, optimizer in zip((plain, deployed), optimizers):
                optimizer.zero_grad()
                net(x).square().mean().backward()
                optimizer.step()
            for (name, a), b in zip(plain.named_parameters(), deployed.parameters()):
                assert (a.grad - b.grad).abs().max().item() < 1e-9, (cls.__name__, name)
        with torch.no_grad():
            assert (plain(x) - deployed(x)).abs().max().item() < 1e-9


def test_torch_compile_on_cpu():
    model = ESC(**tiny_config(window_size=8)).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (torch.compile(model, backend='aot_eager')(x) - model(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize('arch', ['ESC', 'ESCFP'])
def test_torch_export_of_a_deployed_model(arch):
    # torch.export traces fake tensors: the check of a deployed ESC's folded filter against writes read
    # their values (RuntimeError: Cannot access data pointer of Tensor)
    model = randomize_(ARCHS[arch](**tiny_config(window_size=8, kernel_size=13))).double().eval()
    x = torch.rand(1, 3, 20, 18, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model.deploy(), (x, )).module()
        assert (exported(x) - expected).abs().max().item() < 1e-12


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('capture', ['trace', 'export'])
def test_capturing_a_deployment_model_records_no_deploy(capture):
    # deployment: true deployed on the first forward, also one being traced or exported: the graph
    # recorded the fold's write into plk_filter (each call of the trace rewrote the parameter; the
    # exported model kept export's fake tensors as its trained filter), and the trained filter was lost
    model = randomize_(ESC(**tiny_config(window_size=8, kernel_size=13), deployment=True)).double().eval()
    trained = model.plk_filter.detach().clone()
    expected = ESC(**tiny_config(window_size=8, kernel_size=13)).double().eval()
    expected.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 20, 18, dtype=torch.float64)
    with torch.no_grad():
        captured = (torch.jit.trace(model, x, check_trace=False) if capture == 'trace'
                    else torch.export.export(model, (x, )).module())
        assert (captured(x) - expected(x)).abs().max().item() < 1e-12
        assert torch.equal(model.plk_filter, trained)
        assert (model(x) - expected(x)).abs().max().item() < 1e-12 and model.deployed  # deploys as it runs
    assert torch.equal(model.train().plk_filter, trained)


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
def test_torch_jit_trace_passes_its_check_and_runs_other_sizes():
    # the cached dense bias and the deployed model's kept FFT kernel were baked into the trace as
    # constants, so the default check_trace failed ("Graphs differed across invocations")
    for cls in (ESC, ESCFP):
        model = randomize_(cls(**tiny_config(window_size=8))).eval()
        for net in (model, model.deploy()):
            with torch.no_grad():
                net(torch.rand(1, 3, 16, 16))  # a forward first: its caches must not leak into the trace
                traced = torch.jit.trace(net, torch.rand(1, 3, 21, 30))  # padded at the traced size
                for size in ((21, 30), (24, 32), (13, 45)):
                    x = torch.rand(1, 3, *size)
                    expected = net(x)  # the CPU kernels, against the trace's plain float32 operators
                    error = (traced(x) - expected).abs().max().item()
                    assert error < 1e-5 * expected.abs().max().item(), (cls.__name__, size, error)


def test_bad_arguments_and_inputs_are_named():
    base = tiny_config(window_size=8)
    whole = 'must be a whole number'
    for cls, change, message in [
            (ESC, dict(kernel_size=6), 'kernel_size must be an odd'),
            (ESC, dict(pdim=1), 'pdim .1. must be at least 2'),
            (ESCFP, dict(pdim=3), 'pdim .3. must be at least 4'),
            (ESC, dict(window_size=0), f'window_size {whole} >= 1, got 0'),
            (ESC, dict(upscaling_factor=0), 'upscaling_factor must be'),
            # True ran as x1 on the fast path and failed in pixel_shuffle on the plain one
            (ESC, dict(upscaling_factor=True), f'upscaling_factor {whole}'),
            (ESCFP, dict(n_blocks=-1), f'n_blocks {whole} >= 0, got -1'),  # built with no blocks
            (ESC, dict(conv_blocks=-2), f'conv_blocks {whole} >= 0'),
            (ESC, dict(window_size=8.0), f'window_size {whole} >= 1, got 8.0'),  # torch's TypeErrors
            (ESCReal, dict(dim=16.0, upscaling_factor=4), f'dim {whole} >= 1, got 16.0'),
            (ESC, dict(num_heads=2.0), f'num_heads {whole}'),
            (ESC, dict(exp_ratio=0.05), r'exp_ratio 0.05 gives int\(dim \* exp_ratio\) = 0 hidden'),  # "groups must"
            (ESCFP, dict(exp_ratio=-1), 'exp_ratio -1 gives'),
            (ESC, dict(exp_ratio=float('nan')), 'exp_ratio nan gives')]:
        with pytest.raises(ValueError, match=message):
            cls(**{**base, **change})
    with pytest.raises(ValueError, match=r'pdim \(16\) must be in 1..dim \(8\)'):
        ConvAttn(8, 16)
    model = ESC(**base).eval()
    for shape in [(0, 3, 16, 16), (3, 16, 16), (1, 4, 16, 16)]:
        with pytest.raises(ValueError, match=r'takes a \(N >= 1, 3, H, W\) batch'):
            model(torch.rand(shape))


# --------------------------------------------------------------------------------------
# FlashBias (the authors' ESC_FB_* releases): the bias as the product of two learnt factors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['ESC', 'ESCReal'])
def test_flashbias_layout_replaces_each_table_by_two_factors(arch):
    config = tiny_config(**({'upscaling_factor': 4} if arch == 'ESCReal' else {}))
    table_model = ARCHS[arch](**config).state_dict()
    factored = ARCHS[arch](**config, attn_type='FlashBias', flashbias_rank=3).state_dict()
    tokens = config['window_size']**2
    expected = {}
    for key, value in table_model.items():
        if key.endswith('attn.relative_position_bias'):
            prefix = key[:-len('relative_position_bias')]
            for name in ('flashbias_q', 'flashbias_k'):
                expected[prefix + name] = (config['num_heads'], tokens, 3)
        else:
            expected[key] = tuple(value.shape)
    assert {k: tuple(v.shape) for k, v in factored.items()} == expected
    # the authors' default rank: 256 minus the head dim
    default = ESC(**tiny_config(), attn_type='flashbias')
    assert default.blocks[0].attn.flashbias_q.shape[-1] == 256 - 16 // 2


def test_a_table_model_loads_into_flashbias_by_the_svd_of_its_bias(caplog):
    source = randomize_(ESC(**tiny_config()), scale=0.3).double().eval()
    tokens = tiny_config()['window_size']**2
    full = ESC(**tiny_config(), attn_type='FlashBias', flashbias_rank=tokens).double().eval()
    with caplog.at_level(logging.INFO, logger='basicsr'):
        full.load_state_dict(source.state_dict(), strict=True)
    assert 'Decomposed blocks.0.attn.relative_position_bias into rank-16 FlashBias factors' in caplog.text
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():  # full rank: the same network
        assert (full(x) - source(x)).abs().max().item() < 1e-10
    # a lower rank: the best approximation of that rank (Eckart-Young: the error is the dropped singular values)
    low = ESC(**tiny_config(), attn_type='FlashBias', flashbias_rank=3)
    low.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
    layer = low.blocks[0].attn
    assert layer.flashbias_q.dtype == torch.float32
    bias = relative_position_bias(source.blocks[0].attn.relative_position_bias.detach(), 4)
    dropped = torch.linalg.svdvals(bias)[:, 3:].square().sum().sqrt()
    product = (layer.flashbias_q @ layer.flashbias_k.transpose(-2, -1)).double()
    assert abs(torch.linalg.matrix_norm(bias - product).square().sum().sqrt() - dropped) < 1e-5 * dropped
    # a rank above the bias's own: zero columns past it
    wide = WindowAttention(8, 2, 2, attn_type='FlashBias', flashbias_rank=6)
    wide.load_state_dict(WindowAttention(8, 2, 2).state_dict())
    assert torch.equal(wide.flashbias_q[..., 4:], torch.zeros(2, 4, 2))


def test_flashbias_factors_learn_from_their_first_step():
    # the authors start both at zero, where neither gets a gradient; here both do
    layer = WindowAttention(8, 4, 2, attn_type='FlashBias', flashbias_rank=4)
    layer(torch.randn(1, 8, 8, 8)).square().sum().backward()
    assert layer.flashbias_q.grad.abs().min() > 0 and layer.flashbias_k.grad.abs().min() > 0


def test_flashbias_is_a_layout_not_a_backend_to_switch_to():
    model = ESC(**tiny_config(), attn_type='FlashBias', flashbias_rank=3)
    model.set_attn_type('naive')  # its backend may change; its factors stay
    assert model.blocks[0].attn.flashbias and model.blocks[0].attn.attn_type == 'naive'
    with pytest.raises(ValueError, match=r'^ESC: FlashBias is a weight layout of its own .*build the model with '
                                         'attn_type FlashBias'):
        ESC(**tiny_config()).set_attn_type('FlashBias')
    table = ESC(**tiny_config())
    with pytest.raises(RuntimeError, match='flashbias_q'):  # the other way round: PyTorch names the keys
        table.load_state_dict(model.state_dict())


def test_threads_racing_a_first_forward_deploy_once(monkeypatch):
    # every thread saw deployed False and folded the filter again: the symmetrised filter was then
    # kept as the trained one, and undeploy() gave it back
    import threading
    import time
    model = randomize_(ESC(**tiny_config(), deployment=True)).eval()
    trained = model.plk_filter.detach().clone()
    fold, serial = type(model)._fold_filter, threading.Lock()

    def slow_fold(self, *args):  # one fold at a time, then a pause before deploy() says it is done
        with serial:
            result = fold(self, *args)
        time.sleep(0.1)
        return result

    monkeypatch.setattr(type(model), '_fold_filter', slow_fold)
    barrier, x = threading.Barrier(4), torch.rand(1, 3, 9, 9)

    def work(_):
        barrier.wait()
        with torch.inference_mode():
            model(x)

    run_in_threads(work, 4)
    model.undeploy()
    assert torch.equal(model.plk_filter, trained)


def test_the_kept_bias_is_one_attribute_threads_never_see_half_written(monkeypatch):
    # the bias and the copies it is compared with were two attributes: a thread between the two
    # writes saw a bias with no copies (TypeError: 'NoneType' object is not iterable)
    import threading
    layer = WindowAttention(16, 8, 2, 'sdpa').eval()  # SDPA: the dense bias on every path but the kernel's
    x, errors = torch.rand(1, 16, 8, 8), []
    with torch.no_grad():
        expected = layer(x)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-7)  # thread switches as often as they can be: the window is a few bytecodes
    try:
        for _ in range(150):
            layer._drop_bias()
            barrier = threading.Barrier(8)

            def work(_, barrier=barrier):
                barrier.wait()
                try:
                    with torch.inference_mode():
                        assert torch.equal(layer(x), expected)
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(exc)

            run_in_threads(work, 8)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:1]


def test_a_default_flashbias_rank_below_one_says_it_must_be_given():
    with pytest.raises(ValueError, match=r'flashbias_rank must be given: its default, 256 - head dim \(512\), is'):
        WindowAttention(512, 8, 1, 'FlashBias')
