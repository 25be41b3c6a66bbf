"""Tests of ``basicsr bench`` (esc_arch.benchmark); tiny models and inputs only."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from esc_arch import ESC, benchmark
from esc_arch.cli import main as cli_main

TINY_ESC = 'ESC:dim=16,pdim=4,kernel_size=13,n_blocks=1,conv_blocks=1,window_size=8,num_heads=2,upscaling_factor=4'
TINY_EDSR = 'EDSR:num_in_ch=3,num_out_ch=3,num_feat=8,num_block=1,upscale=2'
RECORD_FIELDS = ('arch', 'type', 'options', 'params', 'flops', 'lr_size', 'input_size', 'output_size', 'device',
                 'dtype', 'threads', 'torch_version', 'cpu_model', 'latencies_ms', 'median_ms', 'min_ms', 'max_ms',
                 'peak_memory_mb', 'timestamp')


def settings(**changes):
    base = {'lr_size': (16, 16), 'device': 'cpu', 'dtype': 'fp32', 'runs': 3, 'warmup': 1, 'threads': 1,
            'check': False, 'seed': 0}
    return {**base, **changes}


@pytest.fixture(scope='module')
def esc_record():
    # 12x20 is not a multiple of the window (8): the harness pads it to 16x24
    return benchmark.measure(benchmark.arch_spec(TINY_ESC), settings(lr_size=(12, 20), check=True))


@pytest.fixture(scope='module')
def edsr_record():
    return benchmark.measure(benchmark.arch_spec(TINY_EDSR), settings())


def test_params_are_the_parameter_count(esc_record, edsr_record):
    from basicsr.utils.registry import ARCH_REGISTRY
    for record, text in ((esc_record, TINY_ESC), (edsr_record, TINY_EDSR)):
        spec = benchmark.arch_spec(text)
        model = ARCH_REGISTRY.get(spec['type'])(**spec['options'])
        assert record['params'] == sum(p.numel() for p in model.parameters())


def test_flops_of_a_conv_match_the_analytic_count():
    cin, cout, k, h, w = 3, 8, 3, 10, 12
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2))
    result = benchmark.count_flops(model, torch.rand(1, cin, h, w))
    assert result['flops'] == 2 * cin * cout * k * k * h * w
    assert result['flops_uncounted_ops'] == []


# 8x8 windows; queries computed: whole windows, then windows over the padded bottom / right edge
@pytest.mark.parametrize('size, queries', [((16, 16), 4 * 64), ((12, 16), 2 * 64 + 2 * 4 * 8),
                                           ((12, 13), 64 + 8 * 5 + 4 * 8 + 4 * 5)])
def test_window_attention_flops_are_counted(size, queries):
    # ESC's default attention uses SDPA, which FlopCounterMode misses on CPU; the harness counts
    # on a 'naive' copy, so the total must exceed the SDPA run's count (convolutions and the qkv/out
    # projections) by exactly the two attention matmuls: per block 2 * (2 * n_q * N * c) per window
    # and head, N = window**2 keys, n_q = the window's queries inside the image.
    spec = benchmark.arch_spec(TINY_ESC)
    model = benchmark.build_model(spec)
    x = torch.rand(1, 3, *size)
    from torch.utils.flop_counter import FlopCounterMode

    from esc_arch.kernels import disabled
    model.set_attn_type('sdpa')
    with torch.inference_mode(), disabled(), FlopCounterMode(display=False) as counter:  # PyTorch's ConvFFN
        model(x)
    without_attention = counter.get_total_flops()
    assert counter.get_flop_counts()['Global'][torch.ops.aten.convolution] < without_attention  # + projections
    result = benchmark.count_flops(model, x)
    tokens, dim = 8 * 8, 16
    assert result['flops_attn_type'] == 'naive'
    assert result['flops'] - without_attention == 4 * tokens * dim * queries
    assert model.blocks[0].attn.attn_type == 'sdpa'  # the measured model itself is untouched


def test_separate_runs_share_one_plot(tmp_path, esc_record, edsr_record):
    import copy
    older = copy.deepcopy(esc_record)
    older['timestamp'], older['median_ms'] = '2000-01-01T00:00:00+00:00', 1e9
    edsr = copy.deepcopy(edsr_record)
    edsr['lr_size'] = esc_record['lr_size']
    other_size = copy.deepcopy(edsr_record)
    other_size['lr_size'], other_size['arch'] = [1, 1], 'elsewhere'
    for record in (older, esc_record, edsr, other_size):
        benchmark.write_record(str(tmp_path), record)
    collected = benchmark.collect_records(str(tmp_path), esc_record)
    assert sorted(r['arch'] for r in collected) == sorted([esc_record['arch'], edsr_record['arch']])
    assert [r['median_ms'] for r in collected if r['arch'] == esc_record['arch']] == [esc_record['median_ms']]


def test_latency_stats_padding_and_check(esc_record):
    lat = esc_record['latencies_ms']
    assert len(lat) == 3
    assert esc_record['min_ms'] <= esc_record['median_ms'] <= esc_record['max_ms']
    assert esc_record['min_ms'] == min(lat) and esc_record['max_ms'] == max(lat)
    assert esc_record['input_size'] == [16, 24] and esc_record['lr_size'] == [12, 20]
    assert esc_record['output_size'] == [64, 96]
    assert esc_record['check_max_abs_err'] <= 1e-4


def test_record_names_the_attention_backend(esc_record, edsr_record):
    from esc_arch.kernels import kernel_isa, window_attention_op
    # CPU float32 inference with 8x8 windows and head dim 8: the fused kernel wherever it builds
    fused = window_attention_op() is not None
    assert esc_record['attention_backends'] == (['fused'] if fused else ['sdpa'])
    assert esc_record['fused_kernel_isa'] == (kernel_isa() if fused else None)
    assert esc_record['fused_kernel_isa'] in ((None, ) if not fused else ('avx2', 'avx512'))
    assert edsr_record['attention_backends'] is None and edsr_record['fused_kernel_isa'] is None


def test_record_json_and_plot(tmp_path, esc_record, edsr_record):
    path = benchmark.write_record(str(tmp_path), esc_record)
    with open(path, encoding='utf-8') as handle:
        loaded = json.load(handle)
    for field in RECORD_FIELDS:
        assert field in loaded, field
    assert loaded['params'] == esc_record['params'] and loaded['latencies_ms'] == esc_record['latencies_ms']
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.')]  # no temp files left
    plot = benchmark.plot_records([esc_record, edsr_record], str(tmp_path / 'plot.png'))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot is None
    else:
        with open(plot, 'rb') as handle:
            assert handle.read(8) == b'\x89PNG\r\n\x1a\n'
    table = benchmark.format_table([esc_record, edsr_record])
    assert 'median ms' in table and 'EDSR' in table


def test_option_parsing_and_opt_file(tmp_path):
    assert benchmark.parse_options('depths=[6,6],embed_dim=60,img_range=1.,upsampler=pixelshuffledirect') == {
        'depths': [6, 6], 'embed_dim': 60, 'img_range': 1.0, 'upsampler': 'pixelshuffledirect'}
    opt = tmp_path / 'net.yml'
    opt.write_text('name: tiny_edsr\nnetwork_g:\n  type: EDSR\n  num_in_ch: 3\n  num_out_ch: 3\n  num_feat: 8\n')
    spec = benchmark.opt_spec(str(opt))
    assert spec['type'] == 'EDSR' and spec['options']['num_feat'] == 8 and spec['label'] == 'tiny_edsr'
    assert benchmark.preset_spec('esc-light', 4)['options']['n_blocks'] == 3
    fb = benchmark.preset_spec('esc-fb', 2)['options']  # the authors' FlashBias release builds
    assert fb['attn_type'] == 'FlashBias' and fb['flashbias_rank'] == 48 and fb['upscaling_factor'] == 2
    with torch.device('meta'):
        assert ESC(**fb).blocks[0].attn.flashbias_q.shape == (4, 1024, 48)
    assert benchmark.default_lr_size(4) == (180, 320)
    with pytest.raises(benchmark.BenchError, match='--scale 1000 leaves no pixel'):  # a 0x1 input in the child
        benchmark.default_lr_size(1000)
    with pytest.raises(benchmark.BenchError, match="bad option 'n_blocks=': no value after ="):  # None, in the child
        benchmark.preset_spec('esc:n_blocks=', 4)
    with pytest.raises(benchmark.BenchError, match='x4'):
        benchmark.preset_spec('esc-real', 2)


def test_bad_arch_name_lists_registered_names(capsys):
    assert cli_main(['bench', '--arch', 'NoSuchNet:dim=4']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'NoSuchNet' in err and 'ESC' in err and 'EDSR' in err and 'SwinIR' in err
    # a name BasicSR registered with its _basicsr suffix, as its option files (and basicsr train) name it
    record = benchmark.measure(benchmark.arch_spec('SRVGGNetCompact:num_feat=4,num_conv=1,upscale=2'),
                               settings(lr_size=(6, 8), runs=1, warmup=0))
    assert record['arch'] == 'SRVGGNetCompact' and record['output_size'] == [12, 16]
    assert 'not found' not in capsys.readouterr().out  # BasicSR's 'Name ... is not found, use name' line


def test_fp16_on_cpu_is_a_clear_error(capsys):
    assert cli_main(['bench', '--arch', TINY_EDSR, '--dtype', 'fp16', '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'fp16' in err and 'CUDA' in err and 'Traceback' not in err


def test_bf16_where_it_is_slow_warns_before_measuring(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)

    def stop(*args, **kwargs):
        raise benchmark.BenchError('stopped before measuring')
    monkeypatch.setattr(benchmark, 'run_benchmarks', stop)
    out = ['--out', str(tmp_path)]
    assert cli_main(['bench', '--arch', TINY_EDSR, '--dtype', 'bf16', *out]) == 2
    err = capsys.readouterr().err
    assert 'warning: bf16 on this CPU is ~100x slower than fp32' in err and 'stopped before measuring' in err
    assert cli_main(['bench', '--arch', TINY_EDSR, '--dtype', 'fp32', *out]) == 2
    assert 'warning' not in capsys.readouterr().err
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert cli_main(['bench', '--arch', TINY_EDSR, '--dtype', 'bf16', *out]) == 2
    assert 'warning' not in capsys.readouterr().err


def test_child_process_memory_is_positive():
    # x4 from 128x128: the 512x512x3 fp32 output alone must be resident at the peak
    spec = benchmark.arch_spec('EDSR:num_in_ch=3,num_out_ch=3,num_feat=8,num_block=1,upscale=4')
    record = benchmark.run_in_child(spec, settings(lr_size=(128, 128), runs=1, warmup=0), timeout=120)
    assert record['peak_memory_mb'] > 3 * 512 * 512 * 4 / 2**20
    assert record['output_size'] == [512, 512]


def test_cli_end_to_end_with_preset(tmp_path):
    out = tmp_path / 'bench'
    preset = 'esc:dim=16,pdim=4,n_blocks=1,conv_blocks=1,window_size=8,num_heads=2'
    proc = subprocess.run([sys.executable, '-m', 'esc_arch.cli', 'bench', '--preset', preset, '--lr-size', '16x16',
                           '--runs', '2', '--warmup', '0', '--threads', '1', '--out', str(out), '--no-progress'],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert 'median ms' in proc.stdout and 'esc' in proc.stdout
    records = [name for name in os.listdir(out) if name.endswith('.json')]
    assert len(records) == 1
    with open(out / records[0], encoding='utf-8') as handle:
        record = json.load(handle)
    assert record['arch'] == 'esc' and record['type'] == 'ESC' and record['options']['upscaling_factor'] == 4
    assert record['output_size'] == [64, 64] and len(record['latencies_ms']) == 2
    assert record['peak_memory_mb'] is not None


def test_repeated_archs_are_labelled_by_their_options():
    specs = [benchmark.preset_spec('esc:attn_type=flex', 4), benchmark.preset_spec('esc:attn_type=sdpa', 4),
             benchmark.preset_spec('esc-light', 4), benchmark.arch_spec(TINY_EDSR), benchmark.arch_spec(TINY_EDSR)]
    labels = [spec['label'] for spec in benchmark.unique_labels(specs)]
    assert labels[:3] == ['esc:attn_type=flex', 'esc:attn_type=sdpa', 'esc-light']
    tail = TINY_EDSR.partition(':')[2]
    assert labels[3:] == [f'EDSR:{tail}', f'EDSR:{tail}#2']  # the same options twice: numbered
    assert len({benchmark._safe_name(label) for label in labels}) == len(labels)


# --- the CLI's checks and outputs, with the measurement replaced by a copy of esc_record ----------
FAST = ('--lr-size', '16x16', '--runs', '1', '--warmup', '0', '--threads', '1', '--no-progress')


@pytest.fixture
def fake_measure(monkeypatch, esc_record):
    """``run_in_child`` returns esc_record relabelled for the spec (params and latency from
    n_blocks, all in the same second); the labels of the specs measured are listed."""
    measured = []

    def fake(spec, settings, timeout=None):
        measured.append(spec['label'])
        n_blocks = spec['options'].get('n_blocks', 1)
        return {**copy.deepcopy(esc_record), 'arch': spec['label'], 'type': spec['type'], 'options': spec['options'],
                'source': spec['source'], 'lr_size': list(settings['lr_size']), 'pad': settings['pad'],
                'params': 1000 * n_blocks, 'median_ms': float(n_blocks), 'timestamp': '2026-01-01T00:00:00+00:00'}
    monkeypatch.setattr(benchmark, 'run_in_child', fake)
    return measured


def bench(*args):
    return cli_main(['bench', *args, *FAST])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    return err


def test_output_folders_are_checked_before_measuring(tmp_path, capsys, fake_measure):
    afile = tmp_path / 'afile'
    afile.write_text('')
    assert bench('--preset', 'esc:n_blocks=1', '--out', str(afile)) == 2
    assert 'afile' in one_error_line(capsys) and fake_measure == []
    (tmp_path / 'bp').mkdir()
    (tmp_path / 'bp' / 'afile').write_text('')
    assert bench('--preset', 'esc:n_blocks=1', '--out', str(tmp_path / 'bp'), '--plot', 'afile/p.png') == 2
    assert 'afile' in one_error_line(capsys) and fake_measure == []  # the plot's folder is a file
    # the plot's missing folder is created; the format follows the extension
    pytest.importorskip('matplotlib')
    assert bench('--preset', 'esc:n_blocks=1', '--out', str(tmp_path / 'bp'), '--plot', 'sub/p.svg') == 0
    assert fake_measure == ['esc']
    assert f"plot: {tmp_path / 'bp' / 'sub' / 'p.svg'}" in capsys.readouterr().out
    head = (tmp_path / 'bp' / 'sub' / 'p.svg').read_bytes()[:1000]
    assert head.startswith(b'<?xml') and b'<svg' in head  # not PNG bytes


@pytest.mark.parametrize('plot, problem', [('p.xyz', '.xyz'), ('p', 'no file extension')])
def test_a_plot_format_matplotlib_cannot_write_is_an_error_before_measuring(tmp_path, capsys, fake_measure,
                                                                             plot, problem):
    pytest.importorskip('matplotlib')
    assert bench('--preset', 'esc:n_blocks=1', '--out', str(tmp_path / 'bp'), '--plot', plot) == 2
    err = one_error_line(capsys)
    assert problem in err and '.svg' in err and fake_measure == []


def test_every_spec_is_checked_before_the_first_is_measured(tmp_path, capsys, fake_measure):
    out = tmp_path / 'bm'
    assert bench('--preset', 'esc:n_blocks=1', '--preset', 'esc:foo=1', '--out', str(out)) == 2
    err = one_error_line(capsys)
    assert 'esc:foo=1' in err and 'unknown option(s) foo' in err and 'n_blocks' in err  # names what ESC takes
    assert fake_measure == [] and not out.exists()
    assert bench('--arch', 'EDSR:num_feat=4', '--out', str(out)) == 2
    assert 'missing option(s) num_in_ch, num_out_ch' in one_error_line(capsys)
    assert bench('--preset', 'esc:dim=abc', '--out', str(out)) == 2
    assert "dim must be int, got 'abc'" in one_error_line(capsys)  # a value of the wrong type
    swinir = benchmark.arch_spec('SwinIR:not_an_option=1')  # takes **kwargs: any name goes
    benchmark.check_spec(swinir)


@pytest.mark.parametrize('timeout', ['0', '-1'])
def test_timeout_must_be_positive(tmp_path, capsys, fake_measure, timeout):
    assert bench('--preset', 'esc:n_blocks=1', '--timeout', timeout, '--out', str(tmp_path)) == 2
    assert '--timeout must be' in one_error_line(capsys) and fake_measure == []


def test_runs_of_different_configs_into_one_folder_stay_apart(tmp_path, capsys, fake_measure):
    out = str(tmp_path / 'b')
    for extra in (['--preset', 'esc:n_blocks=1'], ['--preset', 'esc:n_blocks=2'],
                  ['--preset', 'esc:n_blocks=2', '--no-pad']):
        assert bench(*extra, '--out', out) == 0, capsys.readouterr().err
    # all three records in the same second under the label 'esc': none overwrote another
    records = []
    for name in sorted(os.listdir(out)):
        if name.endswith('.json'):
            with open(os.path.join(out, name), encoding='utf-8') as handle:
                records.append(json.load(handle))
    assert sorted((r['options']['n_blocks'], r['pad']) for r in records) == [(1, True), (2, False), (2, True)]
    assert {r['arch'] for r in records} == {'esc'}
    # one plot of all three (padding is not a reason to drop a point; padded points are marked)
    shown = benchmark.collect_records(out, records[0])
    size = 'x'.join(map(str, next(r for r in records if r['pad'])['input_size']))
    assert sorted(benchmark.plot_labels(shown)) == [f'esc:n_blocks=1 (padded to {size})', 'esc:n_blocks=2',
                                                    f'esc:n_blocks=2 (padded to {size})']
    assert 'padded where marked' in benchmark.plot_title(shown)
    only_padded = [r for r in shown if r['pad']]
    assert 'padded to its window' in benchmark.plot_title(only_padded)
    assert all('(padded' not in label for label in benchmark.plot_labels(only_padded))
    assert 'not padded' in benchmark.plot_title([r for r in shown if not r['pad']])


def test_the_same_record_twice_gets_two_files(tmp_path, esc_record):
    first, second = (benchmark.write_record(str(tmp_path), esc_record) for _ in range(2))
    assert first != second and os.path.exists(first) and os.path.exists(second)


ODD_ARCHS = '''
import time
import torch
import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register()
class AssertingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        assert x.shape[-1] > 1000
        return x


@ARCH_REGISTRY.register()
class FlagDeployNet(nn.Module):  # RepVGG style: deploy is a flag, not a method
    def __init__(self):
        super().__init__()
        self.deploy = False
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


@ARCH_REGISTRY.register()
class InPlaceDeployNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def deploy(self):  # folds in place, returns nothing
        self.folded = True

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


@ARCH_REGISTRY.register()
class AttentionNet(nn.Module):  # d channels as tokens of dim 3: q k^T then a v
    def __init__(self):
        super().__init__()
        self.deploy = None

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (1, 1, HW, 3)
        y = F.scaled_dot_product_attention(t, t, t)
        return F.interpolate(y.squeeze(1).transpose(1, 2).reshape(x.shape), scale_factor=2)


@ARCH_REGISTRY.register()
class SleepingNet(nn.Module):
    def forward(self, x):
        time.sleep(60)
        return x
'''


@pytest.fixture
def odd_archs(tmp_path, monkeypatch):
    (tmp_path / 'odd_archs.py').write_text(ODD_ARCHS)
    monkeypatch.chdir(tmp_path)
    return 'odd_archs.py'


def test_a_failing_arch_is_one_line_and_the_others_are_measured(tmp_path, capsys, odd_archs):
    # the arch that fails (an assert, deep in its forward) was the end of the run, its traceback
    # squeezed into the message; RepVGG-style deploy flags and in-place deploy() could not be measured;
    # the workers ran `python -m`, so a yaml.py in the current folder replaced PyYAML in them
    (tmp_path / 'yaml.py').write_text('raise ImportError("a yaml.py in the current folder")\n')
    out = tmp_path / 'out'
    code = cli_main(['bench', '--import', odd_archs, '--arch', 'InPlaceDeployNet', '--arch', 'AssertingNet',
                     '--arch', 'FlagDeployNet',
                     '--out', str(out), '--lr-size', '8x8', '--runs', '1', '--warmup', '0', '--no-progress'])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if 'error' in line]
    assert code == 1 and len(errors) == 1 and 'Traceback' not in captured.err, captured.err
    assert errors[0].startswith('basicsr bench: error: AssertingNet: AssertionError (at odd_archs.py:')
    assert errors[0].endswith('in forward)')
    assert 'basicsr bench: 1 of 3 not measured: AssertingNet' in captured.err
    rows = [line.split()[0] for line in captured.out.splitlines()[2:4]]
    assert rows == ['InPlaceDeployNet', 'FlagDeployNet']
    records = [json.loads(p.read_text()) for p in out.glob('*.json')]
    assert {r['arch']: r['deployed'] for r in records} == {'FlagDeployNet': False, 'InPlaceDeployNet': True}
    assert (out / 'latency_vs_params.png').is_file()


def test_attention_through_sdpa_is_counted_and_not_reported_missing():
    from basicsr.utils.registry import ARCH_REGISTRY
    if 'AttentionNet' not in ARCH_REGISTRY:
        exec(ODD_ARCHS, {})  # registers the test archs in this process
    h, w = 4, 6
    n, d = h * w, 3
    result = benchmark.count_flops(ARCH_REGISTRY.get('AttentionNet')(), torch.rand(1, d, h, w))
    assert result['flops'] >= 2 * (2 * n * n * d)  # q k^T and the weighted sum of v, each 2 n^2 d
    assert result['flops_uncounted_ops'] == []


def test_option_values_and_files_read_as_basicsr_train_reads_them(tmp_path, capsys):
    assert benchmark.parse_options('res_scale=1e-1,depths=[6,6]') == {'res_scale': 0.1, 'depths': [6, 6]}
    with pytest.raises(benchmark.BenchError) as info:
        benchmark.parse_options('depths=[6,6')
    assert '\n' not in str(info.value) and 'depths=[6,6' in str(info.value)
    binary = tmp_path / 'bin.yml'
    binary.write_bytes(b'\xff\xfe\x00network_g')
    with pytest.raises(benchmark.BenchError, match='cannot read .*bin.yml'):
        benchmark.opt_spec(str(binary))
    bad = tmp_path / 'bad.yml'
    bad.write_text('network_g:\n  type: EDSR\n   num_feat: 8\n')
    with pytest.raises(benchmark.BenchError) as info:
        benchmark.opt_spec(str(bad))
    assert '\n' not in str(info.value) and 'at line 3' in str(info.value)


def test_records_with_long_labels_and_foreign_json_in_the_folder(tmp_path, esc_record):
    long = {**esc_record, 'arch': 'EDSR:' + ','.join(f'option_{i}=1.000000000000000' for i in range(20))}
    path = benchmark.write_record(str(tmp_path), long)
    assert os.path.isfile(path) and len(os.path.basename(path)) < 200
    (tmp_path / 'edited.json').write_text(json.dumps({**esc_record, 'params': None}))
    (tmp_path / 'listy.json').write_text(json.dumps({**esc_record, 'options': [1]}))
    assert [r['arch'] for r in benchmark.collect_records(str(tmp_path), esc_record)] == [long['arch']]


def test_a_record_edited_to_a_timestamp_that_is_no_text_is_not_plotted(tmp_path, esc_record):
    # the newest record per configuration is found by comparing timestamps: None or 5 next to text was a TypeError
    benchmark.write_record(str(tmp_path), esc_record)
    for name, stamp in (('unstamped', None), ('numbered', 5)):
        (tmp_path / f'{name}.json').write_text(json.dumps({**esc_record, 'arch': name, 'timestamp': stamp}))
    assert [r['arch'] for r in benchmark.collect_records(str(tmp_path), esc_record)] == [esc_record['arch']]


def test_killing_bench_ends_its_worker_and_removes_its_folder(tmp_path, odd_archs):
    import signal
    import tempfile
    import time
    env = dict(os.environ, TMPDIR=str(tmp_path / 'tmp'))
    os.makedirs(env['TMPDIR'])
    proc = subprocess.Popen([sys.executable, '-m', 'esc_arch.cli', 'bench', '--import', odd_archs, '--arch',
                             'SleepingNet', '--lr-size', '8x8', '--runs', '1', '--out', str(tmp_path / 'out'),
                             '--no-progress'], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    job = None
    while time.monotonic() < deadline and not job:
        job = [p for p in os.listdir(env['TMPDIR']) if p.startswith('esc-bench-')]
        time.sleep(0.2)
    assert job, 'the worker never started'
    time.sleep(3)  # the worker is inside its forward
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith('basicsr bench: interrupted'), err
    assert 'Traceback' not in err
    assert os.listdir(env['TMPDIR']) == []  # the job folder went, and its worker with it
    assert tempfile.gettempdir() != env['TMPDIR']  # (this process's own is untouched)


def test_an_output_not_at_the_scale_the_options_say_is_warned(tmp_path, capsys, fake_measure):
    # the fake measurement returns the tiny ESC's x4 output whatever the options say
    assert bench('--preset', 'esc:upscaling_factor=4', '--out', str(tmp_path / 'a')) == 0
    assert 'warning' not in capsys.readouterr().out
    assert bench('--preset', 'esc:upscaling_factor=2', '--out', str(tmp_path / 'b')) == 0
    assert 'warning: esc: its output 64x96 is x4 its input, but upscaling_factor is 2' in capsys.readouterr().out


def test_archs_are_measured_in_the_order_given(tmp_path, fake_measure):
    # presets were measured first, then --arch, then --opt, whatever the command line said
    opt = tmp_path / 'n3.yml'
    opt.write_text('name: from_yaml\nnetwork_g:\n  type: ESC\n  dim: 16\n  pdim: 4\n  kernel_size: 13\n'
                   '  n_blocks: 3\n  conv_blocks: 1\n  window_size: 8\n  num_heads: 2\n  upscaling_factor: 4\n')
    assert bench('--opt', str(opt), '--arch', TINY_ESC, '--preset', 'esc:n_blocks=2', '--out', str(tmp_path)) == 0
    assert fake_measure == ['from_yaml', 'ESC', 'esc']


@pytest.fixture
def kernel_and_forward_calls(monkeypatch):
    """What ``measure`` calls, in order: 'kernels' (the CPU kernels built or loaded), 'forward'."""
    import esc_arch.kernels
    calls = []
    real_op, real_deploy = esc_arch.kernels.window_attention_op, benchmark.deploy_model
    monkeypatch.setattr(esc_arch.kernels, 'window_attention_op', lambda: calls.append('kernels') or real_op())

    def deploy(model):
        model, deployed = real_deploy(model)
        model.register_forward_pre_hook(lambda *args: calls.append('forward'))
        return model, deployed
    monkeypatch.setattr(benchmark, 'deploy_model', deploy)
    return calls


def test_the_cpu_kernels_are_loaded_before_the_timed_runs(kernel_and_forward_calls):
    # with --warmup 0 the first timed run of an ESC built (cold: ~80 s) or loaded the kernels;
    # measured after this change, a cold build: the first timed run 27 ms
    calls = kernel_and_forward_calls
    benchmark.measure(benchmark.arch_spec(TINY_EDSR), settings(runs=1, warmup=0))
    assert 'kernels' not in calls and calls[0] == 'forward'  # not for other archs
    calls.clear()
    benchmark.measure(benchmark.arch_spec(TINY_ESC), settings(runs=1, warmup=0))
    assert calls[:2] == ['kernels', 'forward']


def test_the_cpu_kernels_are_loaded_before_the_timed_runs_of_an_arch_built_of_escs_layers(tmp_path,
                                                                                         kernel_and_forward_calls):
    # a user's arch around ESC (or its layers): with --warmup 0 its first timed run loaded the kernels (49 ms
    # against 9 ms for ESC itself; minutes on a cold build)
    (tmp_path / 'wrapped_esc_arch.py').write_text(
        'import torch.nn as nn\nfrom basicsr.utils.registry import ARCH_REGISTRY\nfrom esc_arch import ESC\n\n\n'
        '@ARCH_REGISTRY.register()\nclass WrappedTinyESC(nn.Module):\n    def __init__(self):\n'
        '        super().__init__()\n        self.body = ESC(dim=16, pdim=4, kernel_size=13, n_blocks=1, '
        'conv_blocks=1, window_size=8, num_heads=2, upscaling_factor=2)\n\n'
        '    def forward(self, x):\n        return self.body(x)\n')
    imports = benchmark.import_user_archs([str(tmp_path / 'wrapped_esc_arch.py')])
    benchmark.measure(benchmark.arch_spec('WrappedTinyESC'), settings(runs=1, warmup=0, imports=imports))
    assert kernel_and_forward_calls[:2] == ['kernels', 'forward']


def test_the_numbers_of_a_record(monkeypatch):
    # latencies from a faked clock: the median (not the mean) and min/max in their table columns; FLOPs
    # and MACs; the CPU peak in MiB above the VmRSS before the first forward
    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.002, 3.0, 3.010])  # warm-up 5 ms, then 1, 2, 10 ms
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: next(ticks))
    status = {'VmRSS': 100_000, 'VmHWM': 200_000}
    monkeypatch.setattr(benchmark, '_proc_status_kb', status.get)
    monkeypatch.setattr(benchmark, '_max_rss_kb', lambda: 110_240)
    record = benchmark.measure(benchmark.arch_spec(TINY_EDSR), settings(runs=3, warmup=1))
    assert record['latencies_ms'] == pytest.approx([1, 2, 10]) and record['median_ms'] == pytest.approx(2)
    assert (record['min_ms'], record['max_ms']) == pytest.approx((1, 10))
    assert record['peak_memory_mb'] == pytest.approx(10.0) and record['memory_baseline_mb'] == pytest.approx(97.65625)
    assert record['memory_exceeded_baseline_hwm'] is False
    assert record['macs'] == record['flops'] // 2 and record['gflops'] == record['flops'] / 1e9
    header, _, row = benchmark.format_table([record]).splitlines()
    cells = dict(zip([c.strip() for c in header.split('  ') if c.strip()], row.split()))
    assert (cells['median ms'], cells['min ms'], cells['max ms'], cells['peak MB']) == ('2.0', '1.0', '10.0', '10.0')


def test_bench_exit_codes_and_signal_handler(tmp_path, capsys, monkeypatch, fake_measure):
    import signal
    before = signal.getsignal(signal.SIGTERM)
    assert bench('--arch', TINY_ESC, '--out', str(tmp_path / 'a')) == 0
    assert signal.getsignal(signal.SIGTERM) == before  # its Ctrl-C-like SIGTERM handler is put back

    def failing(spec, settings, timeout=None):
        raise benchmark.BenchError(f"{spec['label']}: the measuring process was killed")
    monkeypatch.setattr(benchmark, 'run_in_child', failing)
    assert bench('--arch', TINY_ESC, '--out', str(tmp_path / 'b')) == 2  # nothing measured at all
    capsys.readouterr()
    monkeypatch.setattr(benchmark, 'run_in_child', lambda spec, settings, timeout=None: benchmark.measure(
        spec, settings))  # in this process

    def no_space(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(benchmark, 'plot_records', no_space)
    assert bench('--arch', TINY_EDSR, '--out', str(tmp_path / 'c')) == 1  # the plot was not written
    assert 'cannot write the plot' in capsys.readouterr().err


def test_sizes_seeds_threads_and_same_second_records(tmp_path, monkeypatch):
    with pytest.raises(benchmark.BenchError, match="bad size '0x5'"):
        benchmark.parse_size('0x5')
    seeds, real = [], torch.rand
    monkeypatch.setattr(torch, 'rand', lambda *args, generator=None, **kwargs: (
        seeds.append(generator and generator.initial_seed()), real(*args, generator=generator, **kwargs))[1])
    record = benchmark.measure(benchmark.arch_spec(TINY_EDSR), settings(runs=1, warmup=0, seed=7, threads=None))
    assert 7 in seeds and record['threads'] == benchmark.default_threads()
    paths = {benchmark.write_record(str(tmp_path), record) for _ in range(3)}  # one second, one config
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)


def test_the_default_threads_are_the_cpus_this_process_may_run_on(monkeypatch):
    # taskset, a cgroup cpuset or a Slurm allocation: all the machine's cores would oversubscribe the few allowed
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0}, raising=False)
    record = benchmark.measure(benchmark.arch_spec(TINY_EDSR), settings(runs=1, warmup=0, threads=None))
    assert record['threads'] == torch.get_num_threads() == 1


def test_a_measurement_past_its_timeout_is_stopped():
    import time
    start = time.monotonic()
    with pytest.raises(benchmark.BenchError, match=r'measurement took longer than 0.5 s'):
        benchmark.run_in_child(benchmark.arch_spec(TINY_EDSR), settings(), timeout=0.5)  # the import alone is longer
    assert time.monotonic() - start < 30


def test_a_timeout_also_stops_what_the_worker_started(tmp_path, monkeypatch):
    # e.g. the compiler jobs of a first build of the CPU kernels, which ran on into the next arch's timed
    # runs; ninja starts each in a process group of its own, as the worker's child here is started
    import signal
    import time
    pid_file = tmp_path / 'grandchild.pid'
    monkeypatch.setattr(benchmark, '_WORKER', 'import os, subprocess, time; '
                        'child = subprocess.Popen(["sleep", "120"], preexec_fn=os.setpgrp); '
                        f'open({str(pid_file)!r}, "w").write(str(child.pid)); time.sleep(120)')
    with pytest.raises(benchmark.BenchError, match='measurement took longer than 3 s'):
        benchmark.run_in_child(benchmark.arch_spec(TINY_EDSR), settings(), timeout=3)
    pid = int(pid_file.read_text())

    def running():  # a killed orphan is a zombie until init reaps it
        try:
            with open(f'/proc/{pid}/stat') as handle:
                return handle.read().rsplit(')', 1)[1].split()[0] != 'Z'
        except FileNotFoundError:
            return False
    try:
        deadline = time.monotonic() + 10
        while running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_defaults_and_warnings_the_cli_prints(tmp_path, capsys, monkeypatch, esc_record):
    # one untimed warm-up by default; FLOPs a counter missed are said; a crashed worker's last line is quoted
    seen = []

    def fake(spec, settings, timeout=None):
        seen.append(settings['warmup'])
        return {**copy.deepcopy(esc_record), 'arch': spec['label'], 'flops_uncounted_ops': ['aten.mystery_op']}
    monkeypatch.setattr(benchmark, 'run_in_child', fake)
    assert cli_main(['bench', '--arch', TINY_ESC, '--out', str(tmp_path / 'a'), '--runs', '1', '--no-progress']) == 0
    out = capsys.readouterr().out
    assert seen == [1] and 'warning: ESC: FLOPs miss aten.mystery_op' in out
    monkeypatch.undo()
    worker = tmp_path / 'crash.py'  # what run_in_child runs, as a crashing measurement would end
    worker.write_text('import sys, os\nprint("loading extra weights...", file=sys.stderr)\n'
                      'print("fatal: out of device handles", file=sys.stderr)\nsys.stderr.flush()\nos._exit(3)\n')
    monkeypatch.setattr(benchmark, '_WORKER', worker.read_text())
    with pytest.raises(benchmark.BenchError, match=r'exited with code 3: fatal: out of device handles$'):
        benchmark.run_in_child(benchmark.arch_spec(TINY_EDSR), settings())


def test_records_measured_with_other_threads_are_kept_apart(tmp_path, esc_record):
    two, one = (dict(copy.deepcopy(esc_record), threads=n) for n in (2, 1))
    for record in (two, one):
        benchmark.write_record(str(tmp_path), record)
    assert [r['threads'] for r in benchmark.collect_records(str(tmp_path), two)] == [2]
