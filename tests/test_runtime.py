import os
import subprocess
import sys

import pytest

SCRIPT = '''
import resource, sys, torch
import esc_arch
if sys.argv[1] == 'tuned':
    assert esc_arch.tune_cpu_allocator()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode():
    for _ in range(20):
        # 64 MiB temporaries, as a forward pass at 720p makes them (above glibc's dynamic mmap
        # threshold cap of 32 MiB, so a plain process maps and faults them in every time)
        torch.ones(1 << 24) + 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator settings are Linux-only')
def test_tuned_allocator_reuses_memory_instead_of_faulting_it_in():
    faults = {}
    for mode in ('plain', 'tuned'):
        out = subprocess.run([sys.executable, '-c', SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[mode] = int(out.stdout.split()[-1])
    assert faults['tuned'] * 3 < faults['plain'], faults


def _bf16_over_fp32_time(runs=5):
    """How many times slower a 3x3 conv (32 -> 32 channels, 64x64) runs in bf16 than in fp32 here."""
    import time

    import torch
    conv, x = torch.nn.Conv2d(32, 32, 3, padding=1), torch.randn(1, 32, 64, 64)
    seconds = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core host a second thread's stalls slowed fp32 30x, not bf16
    try:
        with torch.inference_mode():
            for dtype in (torch.float32, torch.bfloat16):
                layer, inp = conv.to(dtype), x.to(dtype)
                layer(inp)
                times = []
                for _ in range(runs):  # the fastest run: oneDNN's first fp32 calls here took 30x its later ones
                    start = time.perf_counter()
                    layer(inp)
                    times.append(time.perf_counter() - start)
                seconds[dtype] = min(times)
    finally:
        torch.set_num_threads(threads)
    return seconds[torch.bfloat16] / seconds[torch.float32]


def test_slow_bf16_warning_says_what_this_cpu_does():
    from esc_arch.runtime import slow_bf16_warning
    warning = slow_bf16_warning('cpu')
    ratio = _bf16_over_fp32_time()
    if warning is None:  # oneDNN runs bf16 here: no reference-path slowdown (measured ~140x where it does)
        assert ratio < 10, ratio
    else:
        assert 'bf16' in warning and 'fp32' in warning
        assert ratio > 10, ratio
    assert slow_bf16_warning('cuda') is None


def test_slow_bf16_warning_follows_pytorchs_onednn_check(monkeypatch):
    import torch

    from esc_arch.models.esr_model import resolve_amp
    from esc_arch.runtime import slow_bf16_warning
    logged = []
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert slow_bf16_warning('cpu') is None
    assert resolve_amp('bf16', torch.device('cpu'), log=logged.append) == (torch.bfloat16, False) and not logged
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert 'slow' in slow_bf16_warning('cpu')
    assert resolve_amp('bf16', torch.device('cpu'), log=logged.append) == (torch.bfloat16, False)
    assert len(logged) == 1 and logged[0].startswith('train.amp: bf16 on this CPU')
    assert resolve_amp(False, torch.device('cpu'), log=logged.append) == (None, False) and len(logged) == 1


def _raise_terminated():
    from esc_arch.runtime import Terminated
    raise Terminated


@pytest.mark.parametrize('raised, code, said', [(KeyboardInterrupt, 130, 'basicsr export: interrupted\n'),
                                                (_raise_terminated, 143, 'basicsr export: terminated\n'),
                                                (BrokenPipeError, 141, '')])
def test_ctrl_c_and_a_closed_stdout_are_no_traceback(monkeypatch, capsys, raised, code, said):
    # Ctrl-C printed a KeyboardInterrupt traceback (upscale, train, export, prepare); `| head` a BrokenPipeError one
    import esc_arch.commands.export as export_command
    from esc_arch.cli import main

    def interrupted(args):
        raise raised() if raised is _raise_terminated else raised
    monkeypatch.setattr(export_command, 'run', interrupted)
    assert main(['export', '-m', 'm.pth', '-o', 'm.onnx']) == code
    assert capsys.readouterr().err == said


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_a_full_stdout_is_one_line_and_the_work_is_done(tmp_path, monkeypatch, capsys):
    # `> /dev/full` was an OSError traceback from the first print, which stopped the command (prepare
    # before its LMDBs, at BasicSR's print; train at its first line): said once, the rest dropped, exit 1
    import cv2
    import numpy as np
    from conftest import tiny_config

    from esc_arch import ESC
    from esc_arch.cli import main
    hr = tmp_path / 'hr'
    hr.mkdir()
    cv2.imwrite(str(hr / 'a.png'), np.random.default_rng(0).integers(0, 256, (60, 72, 3), dtype=np.uint8))
    torch = pytest.importorskip('torch')
    torch.save({'params': ESC(**tiny_config()).state_dict()}, tmp_path / 'esc.pth')
    for command, argv in (('prepare', ['-i', str(hr), '-o', str(tmp_path / 'out'), '--crop', '24', '--step', '24']),
                          ('export', ['-m', str(tmp_path / 'esc.pth'), '-o', str(tmp_path / 'esc.safetensors')])):
        with open('/dev/full', 'w') as full:  # its descriptor is pointed at /dev/null after the failure
            monkeypatch.setattr(sys, 'stdout', full)
            assert main([command, *argv]) == 1
        err = capsys.readouterr().err
        assert 'Traceback' not in err
        said = [line for line in err.splitlines() if 'standard output' in line]
        assert said == [f'basicsr {command}: error: cannot write to standard output: No space left on device '
                        '(the rest of it is dropped)']
    lmdbs = sorted(p.relative_to(tmp_path / 'out').as_posix() for p in (tmp_path / 'out').rglob('*.lmdb'))
    assert lmdbs == [f'hr_LR_bicubic/X{s}_sub.lmdb' for s in (2, 3, 4)] + ['hr_sub.lmdb']
    from esc_arch.data.prepare import lmdb_complete
    keys = sorted(p.stem for p in (tmp_path / 'out' / 'hr_sub').glob('*.png'))
    assert len(keys) > 1 and all(lmdb_complete(str(tmp_path / 'out' / p), keys) for p in lmdbs)
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / 'esc.safetensors')) == set(ESC(**tiny_config()).state_dict())


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
@pytest.mark.parametrize('argv, prog', [(['--help'], 'basicsr'), (['train', '--help'], 'basicsr train'),
                                        (['bench', '--help'], 'basicsr bench')])
def test_help_that_cannot_be_written_is_said_and_exits_1(argv, prog, monkeypatch, capsys):
    # argparse drops a failed help write silently and exits 0: `basicsr train --help > /dev/full` said nothing
    from esc_arch.cli import main
    with open('/dev/full', 'w') as full:
        monkeypatch.setattr(sys, 'stdout', full)
        assert main(argv) == 1
    assert capsys.readouterr().err == (f'{prog}: error: cannot write to standard output: No space left on device '
                                       '(the rest of it is dropped)\n')


def test_help_and_usage_errors_keep_their_exit_codes(capsys):
    from esc_arch.cli import main
    assert main(['train', '--help']) == 0
    assert capsys.readouterr().out.startswith('usage: basicsr train')
    assert main(['train']) == 2
    assert 'the following arguments are required: -opt' in capsys.readouterr().err
    assert main(['nope']) == 2


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_a_worker_whose_parent_ended_before_it_armed_the_signal_ends_too():
    # `kill -9` of bench (or prepare) while its worker was still importing: the death signal, armed
    # afterwards, never came, and the worker measured on as an orphan
    script = ('import os, sys, time; from esc_arch.runtime import die_with_parent; '
              'die_with_parent(int(sys.argv[1])); time.sleep(0.2); print("alive")')
    gone = subprocess.run([sys.executable, '-c', script, '1'], capture_output=True, text=True, timeout=60)
    assert gone.returncode == -15 and 'alive' not in gone.stdout  # its parent is not pid 1: adopted, ended
    here = subprocess.run([sys.executable, '-c', script, str(os.getpid())], capture_output=True, text=True,
                          timeout=60)
    assert here.returncode == 0 and here.stdout.strip() == 'alive', here.stderr


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path):
    # SIGTERM ended `basicsr upscale` at once, without its clean-up; now it is Ctrl-C's path, exit 143
    import signal
    import time
    script = tmp_path / 'slow.py'
    script.write_text('import sys, time\nfrom esc_arch import cli\nimport esc_arch.commands.export as e\n'
                      'def slow(args):\n    try:\n        print("ready", flush=True); time.sleep(60)\n'
                      '    finally:\n        print("cleaned up", flush=True)\n'
                      'e.run = slow\nsys.exit(cli.main(["export", "-m", "m.pth", "-o", "m.onnx"]))\n')
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and out.strip() == 'cleaned up' and err == 'basicsr export: terminated\n', (out, err)
