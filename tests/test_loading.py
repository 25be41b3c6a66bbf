"""esc_arch.load_model: variant and config from keys/shapes alone, strict loading, clear errors."""
import re

import pytest
import torch
from conftest import randomize_, tiny_config
from safetensors.torch import save_file

import esc_arch
from esc_arch import ESC, ESCFP, ESCReal
from esc_arch.loading import CheckpointError, infer_config, read_state_dict

ARCHS = {'ESC': ESC, 'ESCFP': ESCFP, 'ESCReal': ESCReal}


def test_infers_every_released_config(layouts):
    for name, layout in layouts.items():
        state = {k: torch.zeros(shape) for k, shape in layout['state_dict'].items()}
        arch, config = infer_config(state)
        assert arch == layout['type'], name
        expected = dict(layout['config'])
        if arch == 'ESC':
            expected.setdefault('use_ln', False)
        assert config == pytest.approx(expected), name


@pytest.mark.parametrize('wrapper', ['params_ema', 'params', None, 'module'])
def test_load_model_from_pth(tmp_path, wrapper):
    source = randomize_(ESC(**tiny_config(use_ln=True, upscaling_factor=3))).eval()
    state = source.state_dict()
    if wrapper == 'module':
        data = {f'module.{k}': v for k, v in state.items()}
    elif wrapper:
        data = {wrapper: state, 'iter': 7} if wrapper == 'params' else {wrapper: state}
    else:
        data = state
    path = tmp_path / 'net.pth'
    torch.save(data, path)
    model = esc_arch.load_model(path)
    assert isinstance(model, ESC) and not model.training
    assert model.config['upscaling_factor'] == 3 and model.config['use_ln'] is True
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_prefers_params_ema(tmp_path):
    ema = randomize_(ESC(**tiny_config()), seed=1).state_dict()
    raw = randomize_(ESC(**tiny_config()), seed=2).state_dict()
    torch.save({'params': raw, 'params_ema': ema}, tmp_path / 'net.pth')
    model = esc_arch.load_model(tmp_path / 'net.pth')
    assert torch.equal(model.proj.weight, ema['proj.weight'])


@pytest.mark.parametrize('arch', ['ESCFP', 'ESCReal'])
def test_load_model_safetensors(tmp_path, arch):
    config = tiny_config(upscaling_factor=4)
    source = randomize_(ARCHS[arch](**config)).eval()
    save_file(source.state_dict(), str(tmp_path / 'net.safetensors'))
    model = esc_arch.load_model(str(tmp_path / 'net.safetensors'))
    assert type(model) is type(source)
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_shape_mismatch_is_named():
    state = ESC(**tiny_config()).state_dict()
    state['blocks.0.convffns.1.dwc.weight'] = torch.zeros(20, 1, 5, 5)
    with pytest.raises(CheckpointError, match=r'shape mismatches: blocks\.0\.convffns\.1\.dwc\.weight'):
        esc_arch.load_model(state)


def test_missing_and_unexpected_keys_are_named():
    state = ESC(**tiny_config()).state_dict()
    del state['blocks.0.conv_out.bias']
    state['extra.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        esc_arch.load_model(state)
    message = str(info.value)
    assert 'missing keys: blocks.0.conv_out.bias' in message and 'unexpected keys: extra.weight' in message


def test_not_an_esc_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match='not an ESC checkpoint'):
        esc_arch.load_model({'conv_first.weight': torch.zeros(64, 3, 3, 3)})
    (tmp_path / 'broken.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        esc_arch.load_model(tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match='not found'):
        esc_arch.load_model(tmp_path / 'missing.pth')
    with pytest.raises(CheckpointError, match='is a folder: give the .pth or .safetensors file'):  # "not found"
        esc_arch.load_model(tmp_path)
    with pytest.raises(CheckpointError, match='not a tensor'):
        read_state_dict({'proj.weight': 'oops'})
    # what BasicSR's save_training_state writes to training_states/<iter>.state
    model = esc_arch.ESC(dim=8, pdim=4, kernel_size=5, n_blocks=1, conv_blocks=1, window_size=4, num_heads=2,
                         upscaling_factor=2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    torch.save({'epoch': 1, 'iter': 8, 'optimizers': [optimizer.state_dict()], 'schedulers': [scheduler.state_dict()]},
               tmp_path / '8.state')
    with pytest.raises(CheckpointError, match=r'8.state is a BasicSR training state .* give the run\'s '
                                              r'models/net_g_8.pth instead'):
        esc_arch.load_model(tmp_path / '8.state')


def test_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('owned',))

    torch.save({'params': {'x': Evil()}}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        esc_arch.load_model(tmp_path / 'evil.pth')


def test_file_errors_say_what_is_wrong(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='the file is empty'):
        esc_arch.load_model(tmp_path / 'empty.pth')
    good = tmp_path / 'good.pth'
    torch.save({'params_ema': ESC(**tiny_config()).state_dict()}, good)
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        esc_arch.load_model(tmp_path / 'cut.pth')
    (tmp_path / 'text.pth').write_text('hello, not a checkpoint')
    with pytest.raises(CheckpointError, match='not a PyTorch'):
        esc_arch.load_model(tmp_path / 'text.pth')
    torch.save(ESC(**tiny_config()), tmp_path / 'whole.pth')  # the module, not its state dict
    with pytest.raises(CheckpointError, match=r'save its state_dict\(\)') as info:
        esc_arch.load_model(tmp_path / 'whole.pth')
    assert '\n' not in str(info.value)
    state = ESC(**tiny_config()).state_dict()
    state['blocks.0.attn.relative_position_bias'] = state['blocks.0.attn.relative_position_bias'][None]
    with pytest.raises(CheckpointError, match=r'relative_position_bias has shape \(1, 2, 49\)'):
        esc_arch.load_model(state)


def test_an_unreadable_file_is_one_error_saying_so(tmp_path, monkeypatch):
    # a file the user may not read (or an I/O error) was an UnboundLocalError from the error handler
    import builtins
    import errno
    path = tmp_path / 'net.pth'
    torch.save({'params_ema': ESC(**tiny_config()).state_dict()}, path)
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # as for a mode-000 file (the tests may run as root)
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, 'Permission denied', str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', denied)
    with pytest.raises(CheckpointError, match=f'^cannot read checkpoint {re.escape(str(path))}: Permission denied$'):
        esc_arch.load_model(path)


def test_format_follows_the_content_not_the_name(tmp_path):
    source = randomize_(ESC(**tiny_config())).eval()
    torch.save(source.state_dict(), tmp_path / 'torch.SAFETENSORS')  # a torch file with another name
    save_file(source.state_dict(), tmp_path / 'st.pth')  # and a safetensors file named .pth
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = source(x)
        for name in ('torch.SAFETENSORS', 'st.pth'):
            assert torch.equal(esc_arch.load_model(tmp_path / name)(x), expected), name


def test_exp_ratios_that_do_not_round_trip_as_a_fraction():
    # hidden = int(dim * exp_ratio); hidden / dim need not give the same int back (61 / 56 * 56 = 60.99...)
    for dim, ratio in ((56, 1.1), (56, 2.2), (60, 2.05), (180, 2.05), (64, 1.25)):
        source = ESC(**tiny_config(dim=dim, pdim=8, num_heads=2, exp_ratio=ratio))
        model = esc_arch.load_model(source.state_dict())
        hidden = source.blocks[0].convffns[0].proj.out_channels
        assert model.blocks[0].convffns[0].proj.out_channels == hidden, (dim, ratio)
    assert esc_arch.load_model(ESC(**tiny_config(exp_ratio=1.25)).state_dict()).config['exp_ratio'] == 1.25


def test_a_shared_first_name_component_is_dropped():
    state = ESC(**tiny_config()).state_dict()
    model = esc_arch.load_model({'state_dict': {f'model.{k}': v for k, v in state.items()}})  # Lightning
    assert isinstance(model, ESC)


def test_the_param_key_a_network_is_loaded_from_is_said(tmp_path):
    # the training log said "params_ema does not exist, use params" with param_key_g: ~ on a file that
    # has params_ema, and "param key: [None]" when it took params_ema in place of a missing params
    from esc_arch.models.esr_model import pretrained_state_dict
    a, b = ({'w': torch.full((1, ), float(v))} for v in (1, 2))
    cases = [({'params_ema': b}, 'params', 'params_ema', 'Loading: params does not exist, use params_ema.'),
             ({'params': a}, 'params_ema', 'params', 'Loading: params_ema does not exist, use params.'),
             ({'params': a, 'params_ema': b}, None, 'params_ema', 'Loading: no param key is given, use params_ema.'),
             ({'params': a, 'params_ema': b}, 'params_ema', 'params_ema', None),
             ({'params': a, 'params_ema': b}, 'params', 'params', None),
             (a, 'params', None, None)]
    for index, (content, asked, used, said) in enumerate(cases):
        torch.save(content, tmp_path / f'{index}.pth')
        logged = []
        state, key = pretrained_state_dict(str(tmp_path / f'{index}.pth'), asked, log=logged.append)
        expected = content[used] if used else content
        assert key == used and torch.equal(state['w'], expected['w']) and logged == ([said] if said else []), index


def test_a_wrapper_key_without_a_dict_is_passed_over():
    # e.g. EMA switched off, saved as params_ema: None: the network's weights are under params
    state = randomize_(ESC(**tiny_config())).state_dict()
    model = esc_arch.load_model({'params_ema': None, 'params': state})
    assert torch.equal(model.proj.weight, state['proj.weight'])


def test_a_foreign_checkpoint_is_named_by_its_own_keys():
    # the keys share 'body.', but no body.proj.weight: nothing is stripped from the names shown
    with pytest.raises(CheckpointError, match=r'its first keys are body\.0\.weight, body\.1\.weight$'):
        esc_arch.load_model({'body.0.weight': torch.zeros(1), 'body.1.weight': torch.zeros(1)})


def test_truncated_legacy_torch_file_is_named_truncated(tmp_path):
    # torch.save(..., _use_new_zipfile_serialization=False) writes a bare pickle (first byte 0x80)
    good = tmp_path / 'legacy.pth'
    torch.save({'params_ema': ESC(**tiny_config()).state_dict()}, good, _use_new_zipfile_serialization=False)
    assert good.read_bytes()[:1] == b'\x80'
    assert isinstance(esc_arch.load_model(good), ESC)
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='the PyTorch file is truncated or corrupt'):
        esc_arch.load_model(tmp_path / 'cut.pth')


def test_a_pickled_model_is_not_told_to_turn_weights_only_off(tmp_path):
    # PyTorch's own first line suggests weights_only=False (runs the file's code): not repeated here
    torch.save(ESC(**tiny_config()), tmp_path / 'whole.pth')
    with pytest.raises(CheckpointError) as info:
        esc_arch.load_model(tmp_path / 'whole.pth')
    message = str(info.value)
    assert message.endswith('save its state_dict() instead (UnpicklingError)'), message
    assert 'Weights only load failed' not in message and 'weights_only' not in message


def test_missing_to_img_is_one_error_naming_it():
    state = ESC(**tiny_config()).state_dict()
    del state['to_img.weight']
    with pytest.raises(CheckpointError, match='ESC checkpoint is missing to_img.weight, needed to infer its scale'):
        esc_arch.load_model(state)


@pytest.mark.parametrize('arch', [ESC, ESCFP])
def test_another_scales_to_img_is_no_mismatch(arch):
    # ESC's and ESC-FP's loading re-samples a to_img of another scale (x2 weights into an x4 network)
    from esc_arch.loading import describe_mismatch
    x2 = arch(**tiny_config(upscaling_factor=2)).state_dict()
    arch(**tiny_config(upscaling_factor=4)).load_state_dict(x2, strict=True)
    assert describe_mismatch(arch(**tiny_config(upscaling_factor=4)), x2) == ''
    del x2['blocks.0.conv_out.bias']
    assert describe_mismatch(arch(**tiny_config(upscaling_factor=4)), x2) == '1 missing keys: blocks.0.conv_out.bias'


def test_long_key_lists_are_cut_at_the_limit():
    from esc_arch.loading import describe_mismatch
    model = ESC(**tiny_config())
    names = list(model.state_dict())
    for count, more in ((8, ''), (9, ' (+1 more)')):
        state = {k: v for k, v in model.state_dict().items() if k not in names[:count]}
        message = describe_mismatch(model, state)
        assert message == f'{count} missing keys: {"; ".join(names[:8])}{more}', count


def test_load_model_device_and_train_mode():
    state = ESC(**tiny_config()).state_dict()
    model = esc_arch.load_model(state, device='meta', eval=False)  # no weights copied; any device but the CPU
    assert model.training and {p.device.type for p in model.parameters()} == {'meta'}
    assert not esc_arch.load_model(state).training


@pytest.mark.parametrize('arch', [ESC, ESCReal])
def test_load_model_of_a_flashbias_checkpoint(tmp_path, arch):
    """The authors' ESC_FB_* releases: flashbias_q/k in place of each relative_position_bias."""
    config = tiny_config(upscaling_factor=4)
    source = randomize_(arch(**config, attn_type='FlashBias', flashbias_rank=5)).eval()
    torch.save({'params_ema': source.state_dict()}, tmp_path / 'fb.pth')
    name, inferred = infer_config(source.state_dict())
    assert name == arch.__name__
    assert inferred['attn_type'] == 'FlashBias' and inferred['flashbias_rank'] == 5
    assert inferred['window_size'] == config['window_size'] and inferred['num_heads'] == config['num_heads']
    x = torch.rand(1, 3, 9, 6)
    with torch.no_grad():
        expected = source(x)
        for attn_type in ('auto', 'naive', 'flex'):
            model = esc_arch.load_model(tmp_path / 'fb.pth', attn_type=attn_type)
            assert model.blocks[0].attn.flashbias
            assert model.blocks[0].attn.attn_type == ('FlashBias' if attn_type == 'auto' else attn_type)
            assert (model(x) - expected).abs().max().item() < 1e-5 * expected.abs().max().item(), attn_type


def test_a_table_checkpoint_fits_a_flashbias_model_and_not_the_other_way_round():
    from esc_arch.loading import describe_mismatch
    table = ESC(**tiny_config()).state_dict()
    factored = ESC(**tiny_config(), attn_type='FlashBias', flashbias_rank=3)
    assert describe_mismatch(factored, table) == ''  # loading factors the table
    other = dict(table, **{'blocks.0.extra': torch.zeros(1)})
    assert describe_mismatch(factored, other) == '1 unexpected keys: blocks.0.extra'
    assert describe_mismatch(ESC(**tiny_config()), factored.state_dict()) == (
        '1 missing keys: blocks.0.attn.relative_position_bias | '
        '2 unexpected keys: blocks.0.attn.flashbias_q; blocks.0.attn.flashbias_k')


def test_a_table_of_another_window_or_heads_into_a_flashbias_model_is_a_shape_mismatch():
    from esc_arch.loading import describe_mismatch
    factored = ESC(**tiny_config(), attn_type='FlashBias', flashbias_rank=3)  # window 4, 2 heads: (2, 49)
    for other, shape in ((dict(window_size=8), '(2, 225)'), (dict(num_heads=4), '(4, 49)')):
        table = ESC(**tiny_config(**other)).state_dict()
        assert describe_mismatch(factored, table) == (
            f'1 shape mismatches: blocks.0.attn.relative_position_bias: checkpoint {shape} vs model (2, 49)')
        with pytest.raises(RuntimeError, match=rf'copying a table of shape {re.escape(shape)}, this FlashBias layer '
                                               r'\(window 4, 2 heads\) factors one of shape \(2, 49\)'):
            factored.load_state_dict(table)


def test_load_model_does_not_convert_a_table_checkpoint_to_flashbias():
    with pytest.raises(CheckpointError, match="attn_type 'FlashBias': this ESC checkpoint has the relative-position "
                                              'table layout; FlashBias is a layout of its own'):
        esc_arch.load_model(ESC(**tiny_config()).state_dict(), attn_type='FlashBias')
