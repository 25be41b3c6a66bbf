"""basicsr export: ONNX with dynamic batch/height/width checked by onnxruntime; safetensors round trip."""
import sys

import pytest
import torch
from conftest import file_size_limit, randomize_, tiny_config

import esc_arch
from esc_arch import ESC, ESCFP
from esc_arch.cli import main
from esc_arch.commands.export import DEFAULT_OPSET
from esc_arch.export import ExportError, export_onnx, max_opset, require_onnx
from esc_arch.inference import Upscaler


def save_checkpoint(model, path):
    torch.save({'params_ema': model.state_dict()}, path)
    return str(path)


def run_onnx(path, x):
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {'input': x.numpy()})[0])


def test_onnx_cli_round_trip_dynamic_sizes(tmp_path, capsys):
    # window 16: the traced 32x32 sample is large enough that the eager CPU path would take shortcuts
    model = randomize_(ESC(**tiny_config(window_size=16, upscaling_factor=3)), scale=0.05).eval()
    pth = save_checkpoint(model, tmp_path / 'esc.pth')
    out = tmp_path / 'esc.onnx'
    assert main(['export', '-m', pth, '-o', str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count('max abs error') == 2 and 'dynamic batch/height/width' in printed
    reference = Upscaler(esc_arch.load_model(pth))
    for shape in [(1, 3, 21, 40), (3, 3, 17, 9)]:  # neither the traced size nor multiples of the window
        x = torch.rand(shape)
        got = run_onnx(out, x)
        assert got.shape == (shape[0], 3, 3 * shape[2], 3 * shape[3])
        assert (got - reference.forward(x)).abs().max().item() < 1e-4
    import onnx
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.load(str(out)).graph.output}
    assert shapes == {'output': ['batch', 3, 'out_height', 'out_width']}
    assert main(['export', '-m', pth, '-o', str(out)]) == 2  # exists
    assert '--overwrite' in capsys.readouterr().err


def test_onnx_naive_attention_escfp_and_fp16(tmp_path, capsys):
    model = randomize_(ESCFP(**tiny_config(window_size=4)), scale=0.05).eval()
    path = export_onnx(model, tmp_path / 'fp.onnx', attn_type='naive')
    x = torch.rand(2, 3, 11, 6)
    assert (run_onnx(path, x) - Upscaler(model).forward(x)).abs().max().item() < 1e-4
    pth = save_checkpoint(model, tmp_path / 'fp.pth')
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'fp16.onnx'), '--fp16']) == 0
    assert 'fp16' in capsys.readouterr().out
    with pytest.raises(ExportError, match='naive, sdpa'):
        export_onnx(model, tmp_path / 'flex.onnx', attn_type='flex')


@pytest.mark.parametrize('attn_type', ['sdpa', 'naive'])
def test_onnx_of_a_flashbias_model(tmp_path, attn_type):
    # the factored bias is traced as a product of the two factors (the graph's constant is theirs)
    model = ESC(**tiny_config(window_size=8), attn_type='FlashBias', flashbias_rank=3)
    model = randomize_(model, scale=0.05).eval()
    path = export_onnx(model, tmp_path / 'fb.onnx', attn_type=attn_type)
    x = torch.rand(1, 3, 13, 10)
    assert (run_onnx(path, x) - Upscaler(model).forward(x)).abs().max().item() < 1e-4
    assert model.blocks[0].attn.flashbias  # the caller's model keeps its layout


def test_safetensors_round_trip_is_identical(tmp_path, capsys):
    model = randomize_(ESC(**tiny_config(use_ln=True)), scale=0.05).eval()
    pth = save_checkpoint(model, tmp_path / 'esc.pth')
    out = tmp_path / 'esc.safetensors'
    assert main(['export', '-m', pth, '-o', str(out)]) == 0
    back = esc_arch.load_model(out)
    assert back.config == esc_arch.load_model(pth).config
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_export_errors(tmp_path, capsys, monkeypatch):
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'esc.bin')]) == 2
    assert '.onnx or .safetensors' in capsys.readouterr().err
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'esc.safetensors'), '--fp16', '--attn', 'naive']) == 2
    assert '--fp16, --attn: ONNX only' in capsys.readouterr().err  # were ignored
    assert not (tmp_path / 'esc.safetensors').exists()
    foreign = tmp_path / 'foreign.pth'
    torch.save({'weight': torch.zeros(2)}, foreign)
    assert main(['export', '-m', str(foreign), '-o', str(tmp_path / 'f.onnx')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'not an ESC checkpoint' in err[0]
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # as if not installed
    with pytest.raises(ExportError, match=r'pip install esc-arch\[export\]'):
        require_onnx()
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'x.onnx')]) == 2
    assert 'pip install esc-arch[export]' in capsys.readouterr().err


def test_opset_problems_are_one_line_without_the_exporters_graph_dump(tmp_path, capfd):
    # a failing TorchScript export printed its whole graph to the C++ stdout (278 lines for this
    # tiny model, 1 MB for ESC x4) before the error line
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'a.onnx'), '--opset', '13']) == 2
    captured = capfd.readouterr()
    assert captured.err.strip() == ('basicsr export: error: opset 13 is too old for the sdpa attention '
                                    '(it needs 14 or later); --attn naive exports from opset 13')
    newest = max_opset()
    assert newest is not None and newest >= DEFAULT_OPSET  # PyTorch still says which opsets it writes
    for opset in (newest + 1, 10 ** 20):  # the exporter's RuntimeError, and a TypeError for 10 ** 20
        assert main(['export', '-m', pth, '-o', str(tmp_path / 'b.onnx'), '--opset', str(opset)]) == 2
        captured = capfd.readouterr()
        assert captured.out == '' and captured.err == (f'basicsr export: error: opset {opset} is newer than this '
                                                       f'PyTorch exports (at most {newest})\n')
    assert not (tmp_path / 'a.onnx').exists() and not (tmp_path / 'b.onnx').exists()


def test_nonsense_values_of_export_and_prepare_are_refused(tmp_path, capsys):
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'a.onnx'), '--opset', '0']) == 2  # ran as opset 17
    assert 'opset 0 is too old' in capsys.readouterr().err
    for argv, said in ((['-i', str(tmp_path), '--workers', '0'], '--workers must be at least 1, got 0'),  # ran as 1
                       (['-i', str(tmp_path), '--crop', '-1'], 'crop and step must be positive')):  # "multiples"
        assert main(['prepare', *argv]) == 2
        assert said in capsys.readouterr().err


def test_safetensors_on_a_full_disk_is_one_line(tmp_path, capsys):
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    with file_size_limit(5_000):  # SafetensorError ('I/O error: File too large') was a traceback
        assert main(['export', '-m', pth, '-o', str(tmp_path / 'e.safetensors')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'basicsr export: error: cannot write {tmp_path / "e.safetensors"}: '
                                               'the write failed'), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['esc.pth']


def test_unwritable_safetensors_output_is_one_line(tmp_path, capsys):
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    (tmp_path / 'dir.safetensors').mkdir()  # a folder where the file should go
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'dir.safetensors'), '--overwrite']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the output named, not the temp file
    assert err == [f'basicsr export: error: {tmp_path / "dir.safetensors"} is a folder: give a file name']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temp file left


def test_an_onnx_file_that_fails_its_check_fails_the_command_and_is_kept(tmp_path, capsys, monkeypatch):
    import esc_arch.export
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    monkeypatch.setattr(esc_arch.export, 'ONNX_TOLERANCE', {'fp32': -1.0, 'fp16': -1.0})  # no result passes
    assert main(['export', '-m', pth, '-o', str(tmp_path / 'x.onnx')]) == 1
    err = capsys.readouterr().err
    assert 'basicsr export: error: ONNX output differs from PyTorch by' in err and 'is kept for inspection' in err
    assert (tmp_path / 'x.onnx').stat().st_size > 0


def test_export_leaves_the_callers_model_as_it_was_and_writes_the_newest_opset(tmp_path):
    model = randomize_(ESC(**tiny_config()), scale=0.05).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / 'a.onnx', opset=max_opset(), fp16=True, attn_type='naive')  # the newest is allowed
    assert next(model.parameters()).dtype == torch.float32 and not getattr(model, 'deployed', False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {layer.attn_type for layer in model.modules() if hasattr(layer, 'attn_type')} <= {'auto'}
    import onnx
    assert onnx.load(str(tmp_path / 'a.onnx')).opset_import[0].version == max_opset()


def test_each_attention_exports_at_its_lowest_opset(tmp_path):
    # the error for an older opset points at these: they must really export, and run
    import onnx
    model = randomize_(ESC(**tiny_config()), scale=0.05).eval()
    x = torch.rand(1, 3, 9, 7)
    for attn, opset in (('naive', 13), ('sdpa', 14)):
        path = export_onnx(model, tmp_path / f'{attn}.onnx', opset=opset, attn_type=attn)
        assert onnx.load(str(path)).opset_import[0].version == opset
        assert (run_onnx(path, x) - Upscaler(model).forward(x)).abs().max().item() < 1e-4, attn
    with pytest.raises(ExportError, match=r'^opset 12 is too old for the naive attention \(it needs 13 or later\)$'):
        export_onnx(model, tmp_path / 'old.onnx', opset=12, attn_type='naive')


def test_onnx_on_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    pth = save_checkpoint(ESC(**tiny_config()), tmp_path / 'esc.pth')
    with file_size_limit(5_000):  # was 'ONNX export failed (WriteError): ...'
        assert main(['export', '-m', pth, '-o', str(tmp_path / 'e.onnx')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'basicsr export: error: cannot write {tmp_path / "e.onnx"}: '), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['esc.pth']
