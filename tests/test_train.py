"""`basicsr train` / `basicsr test` through the real command, on tiny generated data (CPU).

The subprocess tests run ``python -m esc_arch.cli`` (what the ``basicsr`` script runs) in a
temporary folder; the in-process tests check the model's pieces directly.
"""
import argparse
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import file_size_limit, randomize_, tiny_config

from esc_arch import ESC
from esc_arch.archs.layers import reflect_pad_to_multiple, resample_subpixel_conv
from esc_arch.cli import main as cli_main
from esc_arch.fileio import is_temp_name
from esc_arch.models.esr_model import ESCSRModel, atomic_torch_save, resolve_amp, saved_iterations

SCALE = 4
TINY_ESC = dict(type='ESC', dim=16, pdim=4, kernel_size=7, n_blocks=1, conv_blocks=1, window_size=4, num_heads=2,
                upscaling_factor=SCALE, exp_ratio=1.25)
ENV = dict(os.environ, OMP_NUM_THREADS='2', PYTHONWARNINGS='ignore')


def make_pairs(root: Path) -> Path:
    """4 pairs: HR 32x32, LR 8x8 (area-downscaled HR), as PairedImageDataset reads them."""
    rng = np.random.default_rng(0)
    (root / 'hr').mkdir(parents=True)
    (root / 'lr').mkdir()
    for index in range(4):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        hr = cv2.resize(base, (32, 32), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / 'hr' / f'{index:03d}.png'), hr)
        cv2.imwrite(str(root / 'lr' / f'{index:03d}.png'), cv2.resize(hr, (8, 8), interpolation=cv2.INTER_AREA))
    return root


def make_lmdbs(data: Path) -> dict:
    """hr.lmdb and lr.lmdb of ``make_pairs``' images, written by BasicSR's writer (as basicsr prepare does)."""
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    lmdbs = {}
    for side in ('hr', 'lr'):
        names = sorted(os.listdir(data / side))
        lmdbs[side] = data / f'{side}.lmdb'
        make_lmdb_from_imgs(str(data / side), str(lmdbs[side]), names, [n.split('.')[0] for n in names],
                            map_size=1 << 24)
    return lmdbs


def write_lmdb(folder: Path, meta: str) -> Path:
    """An LMDB of dummy values under every key its meta_info.txt ``meta`` lists (BasicSR's keys: each
    line up to its first dot), for the checks, which read the list and the database's keys."""
    import lmdb
    folder.mkdir(exist_ok=True)
    (folder / 'meta_info.txt').write_text(meta)
    env = lmdb.open(str(folder), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for key in {line.split('.')[0] for line in meta.splitlines()} - {''}:
            txn.put(key.encode(), b'')
    env.close()
    return folder


def paired(name: str, data: Path, **extra) -> dict:
    return dict(name=name, type='PairedImageDataset', dataroot_gt=str(data / 'hr'), dataroot_lq=str(data / 'lr'),
                io_backend=dict(type='disk'), **extra)


def train_options(data: Path, name: str = 'tiny', **train) -> dict:
    train_opt = dict(ema_decay=0.999, optim_g=dict(type='AdamW', lr=5e-4, weight_decay=0, betas=[0.9, 0.9]),
                     scheduler=dict(type='MultiStepLR', milestones=[1000], gamma=0.5), total_iter=4, warmup_iter=2,
                     grad_clip=1.0, pixel_opt=dict(type='L1Loss', loss_weight=1.0, reduction='mean'))
    train_opt.update(train)
    return dict(
        name=name, model_type='ESCSRModel', scale=SCALE, num_gpu=0, manual_seed=0,
        datasets=dict(train=paired('tiny', data, gt_size=16, use_hflip=True, use_rot=True, num_worker_per_gpu=0,
                                   batch_size_per_gpu=2, dataset_enlarge_ratio=1),
                      val=paired('tinyval', data)),
        network_g=dict(TINY_ESC), path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None),
        train=train_opt,
        val=dict(val_freq=2, save_img=False,
                 metrics=dict(psnr=dict(type='calculate_psnr', crop_border=SCALE, test_y_channel=True))),
        logger=dict(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False))


def write_yaml(path: Path, opt: dict) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def basicsr(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, '-m', 'esc_arch.cli', *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def newest_log(folder: Path) -> str:
    return max(folder.glob('*.log'), key=lambda p: p.stat().st_mtime).read_text()


def resumed_log(tmp_path: Path, opt_file: Path, experiment: Path, last: int, total: int) -> str:
    """The log of ``basicsr train --auto_resume`` to ``total``, checked to go on past ``last``."""
    result = basicsr('train', '-opt', opt_file, '--auto_resume', '--force_yml', f'train:total_iter={total}',
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = newest_log(experiment)
    assert re.search(rf'iter:\s+{last + 1},', log)
    return log


# ---------------------------------------------------------------------------------- subprocess
def test_train_kill_resume_then_test(tmp_path):
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, total_iter=100000)
    opt['logger']['save_checkpoint_freq'] = 1
    opt_file = write_yaml(tmp_path / 'train.yml', opt)
    experiment = tmp_path / 'experiments' / 'tiny'
    states = experiment / 'training_states'

    # 1. train until a state is saved, then kill -9 (no chance to clean up)
    proc = subprocess.Popen([sys.executable, '-m', 'esc_arch.cli', 'train', '-opt', str(opt_file)], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not saved_iterations(states) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, f'training ended early (rc {proc.returncode})'
        assert saved_iterations(states), 'no training state within 60 s'
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kill may land mid-save: a hidden temp file then sits next to the complete states
    saved = saved_iterations(states)
    names = os.listdir(states)
    assert all(name in {f'{it}.state' for it in saved} or is_temp_name(name) for name in names), names
    stale = experiment / 'models' / '.net_g_999.abcd1234.tmp.pth'
    stale.write_bytes(b'partial')  # as a kill mid-save of a model leaves it
    for it in saved:  # atomic writes: every visible file is complete
        state = torch.load(states / f'{it}.state', weights_only=True)
        assert state['iter'] == it
        net = torch.load(experiment / 'models' / f'net_g_{it}.pth', weights_only=True)
        assert set(net) == {'params', 'params_ema'}
    last = saved[-1]

    # 2. --auto_resume continues from the newest state
    log = resumed_log(tmp_path, opt_file, experiment, last, last + 2)
    assert re.search(rf'Resuming training from epoch: \d+, iter: {last}\.', log)
    assert re.search(rf'Start training from epoch: \d+, iter: {last}\n', log)
    assert not re.search(r'iter:\s+1,', log)  # did not start over
    assert re.search(r'# psnr: \d+\.\d+', log)
    assert (experiment / 'models' / 'net_g_latest.pth').is_file()
    assert (states / f'{last + 2}.state').is_file()
    assert not stale.exists()  # resume cleared what the killed run left half-written
    assert not [n for d in (states, experiment / 'models') for n in os.listdir(d) if is_temp_name(n)]

    # 3. basicsr test on the trained model: images and a PSNR line
    test_opt = dict(name='tiny_test', model_type='ESRModel', scale=SCALE, num_gpu=0,
                    datasets=dict(test_1=paired('tinytest', data)), network_g=dict(TINY_ESC),
                    path=dict(pretrain_network_g=str(experiment / 'models' / 'net_g_latest.pth'),
                              param_key_g='params_ema', strict_load_g=True),
                    val=dict(save_img=True, suffix=None,
                             metrics=dict(psnr=dict(type='calculate_psnr', crop_border=SCALE, test_y_channel=True))))
    result = basicsr('test', '-opt', write_yaml(tmp_path / 'test.yml', test_opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r'# psnr: \d+\.\d+', result.stdout + result.stderr)
    images = sorted((tmp_path / 'results' / 'tiny_test' / 'visualization' / 'tinytest').glob('*.png'))
    assert len(images) == 4
    assert cv2.imread(str(images[0])).shape == (32, 32, 3)
    # a val section without save_img saves them too (basicsr test's default)
    test_opt.update(name='tiny_test_metrics', val=dict(metrics=test_opt['val']['metrics']))
    result = basicsr('test', '-opt', write_yaml(tmp_path / 'metrics.yml', test_opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / 'results' / 'tiny_test_metrics' / 'visualization' / 'tinytest').glob('*.png'))) == 4
    # an empty `val:` (all of it commented out) is no val section: images saved, no metrics
    test_opt.update(name='tiny_test_noval', val=None)
    result = basicsr('test', '-opt', write_yaml(tmp_path / 'noval.yml', test_opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / 'results' / 'tiny_test_noval' / 'visualization' / 'tinytest').glob('*.png'))) == 4


def _wait_for_iteration(experiment: Path, proc, iteration: int, timeout: float = 90) -> None:
    """Until the run's log shows ``iteration`` (print_freq 1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(experiment.glob('*.log')) if experiment.is_dir() else []
        if logs and re.search(rf'iter:\s+{iteration},', newest_log(experiment)):
            return
        time.sleep(0.2)
    raise AssertionError(f'iteration {iteration} not reached (rc {proc.poll()})')


@pytest.mark.parametrize('how', ['SIGTERM to the process', 'SIGINT to the process group, loader workers',
                                 'SIGTERM to the process group, loader workers'])
def test_a_signal_stops_training_after_saving_the_iteration_under_way(tmp_path, how):
    # SIGTERM (kill, a scheduler) ended the run at once and Ctrl-C with a traceback: every iteration
    # since the last checkpoint (here: none in 1000) was lost
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, total_iter=100000)
    opt['logger']['save_checkpoint_freq'] = 1000
    opt['val']['val_freq'] = 1000
    if how.endswith('workers'):
        opt['datasets']['train']['num_worker_per_gpu'] = 2
    opt_file = write_yaml(tmp_path / 'train.yml', opt)
    experiment = tmp_path / 'experiments' / 'tiny'
    states = experiment / 'training_states'
    signum = signal.SIGTERM if how.startswith('SIGTERM') else signal.SIGINT
    to_group = 'group' in how  # what a terminal's Ctrl-C does (SIGINT), or SLURM, systemd (SIGTERM)
    proc = subprocess.Popen([sys.executable, '-m', 'esc_arch.cli', 'train', '-opt', str(opt_file)], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_iteration(experiment, proc, 3)
        if to_group:  # the main process and its loader workers
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.strip().splitlines()
    tail = '\n'.join(lines[-12:])
    assert proc.returncode == 128 + signum, tail
    saved = saved_iterations(states)
    assert len(saved) == 1 and saved[0] >= 3, f'{saved}\n{tail}'
    last = saved[0]
    assert lines[-1] == (f'basicsr train: stopped by {signum.name} after iteration {last}, which is saved (models and '
                         'training state): add --auto_resume to go on from it')
    assert 'Traceback' not in err
    log = newest_log(experiment)
    assert not re.search(rf'iter:\s+{last + 1},', log)  # it stopped where it saved
    state = torch.load(states / f'{last}.state', weights_only=True)
    assert state['iter'] == last
    assert set(torch.load(experiment / 'models' / f'net_g_{last}.pth', weights_only=True)) == {'params', 'params_ema'}

    log = resumed_log(tmp_path, opt_file, experiment, last, last + 1)
    assert re.search(rf'Resuming training from epoch: {state["epoch"]}, iter: {last}\.', log)


@pytest.mark.skipif(not hasattr(signal, 'SIGCHLD'), reason='POSIX signals')
def test_loader_workers_ended_by_the_stopping_sigterm_raise_nothing_mid_iteration():
    # a SIGTERM to every process (SLURM) ends the loader's workers too; PyTorch's SIGCHLD handler then
    # raised 'DataLoader worker ... is killed by signal' wherever the main process was: seen inside
    # the stop's own torch.save (taken for a full disk), and it can land inside optimize_parameters
    from esc_arch.commands._stopping import _Stop

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, index):
            time.sleep(0.01)
            return index

    def end_a_worker(iterator):  # from another process, as a scheduler's signal comes
        pid = iterator._workers[0].pid
        subprocess.run([sys.executable, '-c', f'import os, signal; os.kill({pid}, signal.SIGTERM)'], check=True)
        time.sleep(2)  # a handler that raises does so here

    stop = _Stop()
    stop.install()
    try:
        iterator = iter(torch.utils.data.DataLoader(Slow(), num_workers=2))
        next(iterator)
        loaders_handler = signal.getsignal(signal.SIGCHLD)
        stop.done = 5  # an unsaved iteration: the first signal asks to stop
        stop.on_signal(signal.SIGTERM, None)
        end_a_worker(iterator)
        del iterator
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGCHLD) is loaders_handler  # put back for the next run
    iterator = iter(torch.utils.data.DataLoader(Slow(), num_workers=2))
    next(iterator)
    with pytest.raises(RuntimeError, match='killed by signal'):  # (what it does outside a stop)
        end_a_worker(iterator)


def test_a_second_signal_or_nothing_to_save_stops_at_once():
    from esc_arch.commands._stopping import TrainingInterrupted, _Stop

    class Model:
        device = torch.device('cpu')

        def __init__(self):
            self.saves = []

        def optimize_parameters(self, current_iter):
            pass

        def save(self, epoch, current_iter):
            self.saves.append((epoch, current_iter))

        def validation(self, *args):
            pass

    stop, model = _Stop(), Model()
    with pytest.raises(TrainingInterrupted) as raised:  # before the model is built
        stop.on_signal(signal.SIGINT, None)
    assert raised.value.line() == 'stopped by SIGINT before an iteration of this run ended (nothing to save)'
    stop.watch(model, resumed_iter=10)
    with pytest.raises(TrainingInterrupted) as raised:  # resumed, nothing trained yet: nothing to save
        stop.on_signal(signal.SIGINT, None)
    assert raised.value.saved is None and raised.value.exit_code == 130
    assert raised.value.line() == 'stopped by SIGINT; iteration 10, the last saved, is where --auto_resume goes on'
    sampler = type('Sampler', (), {'set_epoch': lambda self, epoch: None})()
    stop.follow_epochs(sampler)
    sampler.set_epoch(4)  # BasicSR's loop, at an epoch's start
    model.optimize_parameters(11)
    stop.on_signal(signal.SIGTERM, None)  # iteration 11 unsaved: asks to stop, and does not raise
    with pytest.raises(TrainingInterrupted) as raised:  # a second signal: at once, without saving
        stop.on_signal(signal.SIGTERM, None)
    assert raised.value.saved is None and model.saves == []
    assert raised.value.line() == ('stopped by SIGTERM (a second signal: at once, without saving); iteration 10, the '
                                   'last saved, is where --auto_resume goes on')
    stop.inside = True  # a failure inside an iteration (its model may be half-updated): nothing is saved
    assert stop.after_failure(RuntimeError('DataLoader worker (pid 7) is killed by signal')).line() == (
        'stopped by SIGTERM (inside an iteration, not saved: DataLoader worker (pid 7) is killed by signal); '
        'iteration 10, the last saved, is where --auto_resume goes on')
    stop.inside = False
    with pytest.raises(TrainingInterrupted) as raised:  # the validation's end is a stop point too
        model.validation()
    assert raised.value.saved == 11 and raised.value.exit_code == 143 and model.saves == [(4, 11)]
    stop.requested = None
    model.save(4, 12)  # a periodic checkpoint at the iteration under way
    model.optimize_parameters(12)
    with pytest.raises(TrainingInterrupted) as raised:  # iteration 12 is saved: at once
        stop.on_signal(signal.SIGINT, None)
    assert raised.value.saved is None and raised.value.last_saved == 12

    class FullDisk(Model):  # as ESCSRModel.save on a full disk: warnings, then no state file
        opt = {'path': {'training_states': '/nonexistent'}}

        def save(self, epoch, current_iter):
            self.saves.append((epoch, current_iter))

    stop, model = _Stop(), FullDisk()
    stop.watch(model, resumed_iter=10)
    model.optimize_parameters(11)
    stop.on_signal(signal.SIGTERM, None)
    with pytest.raises(TrainingInterrupted) as raised:
        model.validation()
    assert model.saves == [(0, 11)] and raised.value.saved is None
    assert raised.value.line() == ('stopped by SIGTERM; iteration 11 could not be saved (see the warnings above); '
                                   'iteration 10, the last saved, is where --auto_resume goes on')


def test_nan_loss_stops_with_message(tmp_path):
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, name='diverge', total_iter=50, warmup_iter=-1, grad_clip=None, ema_decay=0,
                        optim_g=dict(type='Adam', lr=1e30))  # a real divergence: weights overflow
    opt['logger']['save_checkpoint_freq'] = 1
    opt.pop('val')
    opt['datasets'].pop('val')
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'diverge.yml', opt), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    match = re.search(r'loss is (nan|inf) at iteration (\d+); stopping \(last good state: (\S+)\)', output)
    assert match, output[-3000:]
    iteration, state = int(match.group(2)), Path(match.group(3))
    assert iteration > 1 and state.name == f'{iteration - 1}.state' and state.is_file()
    assert 'Traceback' not in output


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch without distributed')
def test_cpu_ddp_with_torchrun(tmp_path):
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, name='ddp', total_iter=2, amp='bf16')
    opt['logger']['save_checkpoint_freq'] = 2
    opt_file = write_yaml(tmp_path / 'ddp.yml', opt)
    torchrun = shutil.which('torchrun', path=os.path.dirname(sys.executable)) or 'torchrun'
    result = subprocess.run([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'esc_arch.cli', 'train', '-opt',
                             str(opt_file), '--launcher', 'pytorch'], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    log = newest_log(tmp_path / 'experiments' / 'ddp')
    assert re.search(r'World size \(gpu number\): 2', log)
    assert 'Mixed precision: bfloat16 autocast' in log
    assert re.search(r'iter:\s+2,', log)
    assert (tmp_path / 'experiments' / 'ddp' / 'models' / 'net_g_latest.pth').is_file()


def _child_with_env(parent: int, entry: bytes, timeout: float = 60) -> int:
    """The pid of a child process of ``parent`` whose environment holds ``entry`` (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                ppid = int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])
                if ppid == parent and entry in Path(f'/proc/{pid}/environ').read_bytes().split(b'\0'):
                    return int(pid)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.2)
    raise AssertionError(f'no child of {parent} with {entry!r}')


@pytest.mark.skipif(not torch.distributed.is_available() or not os.path.isdir('/proc'),
                    reason='needs torch.distributed and /proc')
def test_cpu_ddp_processes_stop_together_when_one_gets_a_signal(tmp_path):
    # the processes agree at each iteration's end: process 1's SIGINT stops both there, process 0 saves
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, name='ddpstop', total_iter=100000)
    opt['logger']['save_checkpoint_freq'] = 1000
    opt['val']['val_freq'] = 1000
    opt_file = write_yaml(tmp_path / 'ddpstop.yml', opt)
    experiment = tmp_path / 'experiments' / 'ddpstop'
    torchrun = shutil.which('torchrun', path=os.path.dirname(sys.executable)) or 'torchrun'
    proc = subprocess.Popen([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'esc_arch.cli', 'train', '-opt',
                             str(opt_file), '--launcher', 'pytorch'], cwd=tmp_path, env=dict(ENV, OMP_NUM_THREADS='1'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        rank1 = _child_with_env(proc.pid, b'RANK=1')
        _wait_for_iteration(experiment, proc, 3, timeout=120)
        os.kill(rank1, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = saved_iterations(experiment / 'training_states')
    assert len(saved) == 1 and saved[0] >= 3, err[-3000:]
    assert f'basicsr train: stopped by SIGINT after iteration {saved[0]}, which is saved' in err, err[-3000:]
    assert 'another one stopped' not in err and 'Connection closed' not in err, err[-3000:]
    assert not re.search(rf'iter:\s+{saved[0] + 1},', newest_log(experiment))
    assert (experiment / 'models' / f'net_g_{saved[0]}.pth').is_file()


def test_cpu_ddp_names_a_corrupt_image_from_a_spawned_worker(tmp_path):
    # under DDP BasicSR spawns its loader workers, which import BasicSR afresh: the decode-error
    # patches are applied there too; the other process says it stops because this one did
    data = make_pairs(tmp_path / 'data')
    (data / 'lr' / '002.png').write_bytes((data / 'lr' / '002.png').read_bytes()[:60])  # truncated PNG
    opt = train_options(data, name='ddpbad', total_iter=8)
    opt['datasets']['train'].update(batch_size_per_gpu=1, num_worker_per_gpu=1)
    opt_file = write_yaml(tmp_path / 'ddpbad.yml', opt)
    torchrun = shutil.which('torchrun', path=os.path.dirname(sys.executable)) or 'torchrun'
    result = subprocess.run([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'esc_arch.cli', 'train', '-opt',
                             str(opt_file), '--launcher', 'pytorch'], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    named = [line for line in lines if line.startswith('basicsr train: error: cannot read an image of ')]
    assert len(named) == 1 and '002.png' in named[0], lines[-30:]
    assert named[0].endswith('(corrupt or truncated?)'), named  # a whole line, not interleaved with the other's
    # the other process says why it stops, or, when it was still inside a slow step as torchrun's
    # agent saw the failure (a loaded host), the agent ends it with SIGTERM (which stops it as a
    # signal does, exit 143, or kills it, -15) and its summary says so
    peer_stopped = re.search(r'basicsr train: error: process [01] of 2 stops: another one stopped', result.stderr)
    terminated = re.search(r'exitcode\s*: (-15 .*\(SIGTERM\)|143 )', result.stderr)
    assert peer_stopped or terminated, lines[-30:]
    tracebacks = re.findall(r'Traceback \(most recent call last\):\n\s+File "([^"]+)"', result.stderr)
    assert all(os.path.basename(file) == 'torchrun' for file in tracebacks), lines[-30:]  # only the agent's summary
    assert "'NoneType' object has no attribute" not in result.stderr
    assert 'Connection closed by peer' not in result.stderr


def test_dist_follows_the_launcher(tmp_path):
    # --force_yml dist=true without a launcher used to fail deep in model_to_device
    opt = train_options(make_pairs(tmp_path / 'data'), total_iter=1, warmup_iter=-1)
    opt['val']['val_freq'] = 10
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'dist.yml', opt), '--force_yml', 'dist=true', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'dist is set by --launcher (none): ignoring dist=True' in result.stdout
    assert re.search(r'iter:\s+1,', newest_log(tmp_path / 'experiments' / 'tiny'))


# ---------------------------------------------------------------------------------- in-process
def run_cli(capsys, *argv):
    code = cli_main(list(map(str, argv)))
    return code, capsys.readouterr().err.strip()


def test_option_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_pairs(tmp_path / 'data')
    bad = tmp_path / 'broken.yml'
    bad.write_text('name: x\n  model_type: [\n')
    code, err = run_cli(capsys, 'train', '-opt', bad)
    assert code == 2 and err.count('\n') == 0 and 'broken.yml' in err and 'line 2' in err
    code, err = run_cli(capsys, 'train', '-opt', tmp_path)  # said "not found"
    assert code == 2 and err == f'basicsr train: error: option file {tmp_path} is a folder', err

    opt = train_options(data)
    opt['datasets']['train']['dataroot_lq'] = str(tmp_path / 'nowhere' / 'lr')
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'missing.yml', opt))
    assert code == 2 and str(tmp_path / 'nowhere' / 'lr') in err and err.count('\n') == 0

    opt = train_options(data)
    opt['network_g']['type'] = 'NoSuchNet'
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'arch.yml', opt))
    assert code == 2 and err.count('\n') == 0, err
    assert "unknown arch 'NoSuchNet'" in err and 'arch.yml' in err
    for name in ('ESC', 'ESCFP', 'SwinIR', 'EDSR', 'RCAN', 'UNetDiscriminatorSN'):
        assert re.search(rf'\b{name}\b', err)
    assert '_basicsr' not in err  # BasicSR's suffixed registry keys, listed as the names option files use

    opt = train_options(data)
    opt['network_g']['windowsize'] = 16  # not an ESC argument: named, with the ones it takes
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'kwarg.yml', opt))
    assert code == 2 and 'unknown option(s) windowsize' in err and 'window_size' in err

    opt = train_options(data)
    opt['model_type'] = 'NoSuchModel'
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'model.yml', opt))
    assert code == 2 and "'NoSuchModel'" in err and 'ESCSRModel' in err and 'ESRModel' in err

    code, err = run_cli(capsys, 'test', '-opt', tmp_path / 'absent.yml')
    assert code == 2 and 'absent.yml' in err
    assert not (tmp_path / 'experiments').exists()


def model_options(tmp_path, is_train=True, network=None, **train):
    opt = train_options(Path('unused'), **train)
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1, auto_resume=False,
               network_g=network or dict(TINY_ESC))
    opt['path'].update(models=str(tmp_path), training_states=str(tmp_path))
    return opt


@pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')
def test_warmup_is_linear_and_ends_at_the_base_lr(tmp_path):
    model = ESCSRModel(model_options(tmp_path, warmup_iter=4, scheduler=dict(type='MultiStepLR', milestones=[6],
                                                                             gamma=0.5)))
    lrs = []
    for it in range(1, 9):
        model.update_learning_rate(it, warmup_iter=4)
        lrs.append(model.get_current_learning_rate()[0] / 5e-4)
    # BasicSR's own version stays at 3/4 after the warm-up with MultiStepLR; a milestone m
    # takes effect at iteration m + 1 (BasicSR steps the scheduler from iteration 2 on)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.5, 0.5])


def test_optimizers_and_amp_settings(tmp_path):
    model = ESCSRModel(model_options(tmp_path, optim_g=dict(type='Adam', lr=1e-3)))
    assert type(model.optimizer_g) is torch.optim.Adam
    assert type(ESCSRModel(model_options(tmp_path)).optimizer_g) is torch.optim.AdamW
    with pytest.raises(ValueError, match='AdamW'):
        ESCSRModel(model_options(tmp_path, optim_g=dict(type='Adamm', lr=1e-3)))
    cpu = torch.device('cpu')
    assert resolve_amp(False, cpu) == (None, False) and resolve_amp(None, cpu) == (None, False)
    assert resolve_amp('bf16', cpu) == (torch.bfloat16, False)
    assert resolve_amp('fp16', cpu) == (torch.bfloat16, False)  # no fp16 autocast on CPU
    with pytest.raises(ValueError, match='bf16, fp16 or false'):
        resolve_amp('int8', cpu)


def test_validation_pads_to_the_window_and_crops_back(tmp_path):
    model = ESCSRModel(model_options(tmp_path, is_train=False))
    net = model.net_g
    model.lq = torch.rand(1, 3, 10, 9)
    model.test()
    assert model.output.shape == (1, 3, 10 * SCALE, 9 * SCALE)
    with torch.no_grad():
        expected = net.eval()(reflect_pad_to_multiple(model.lq, 4))[..., :10 * SCALE, :9 * SCALE]
    torch.testing.assert_close(model.output, expected)


@pytest.mark.parametrize('strict', [True, False])
def test_pretrained_network_from_another_scale_loads(tmp_path, strict):
    x2 = ESC(**{**{k: v for k, v in TINY_ESC.items() if k != 'type'}, 'upscaling_factor': 2})
    path = tmp_path / 'x2.pth'
    torch.save({'params': x2.state_dict(), 'params_ema': x2.state_dict()}, path)
    opt = model_options(tmp_path, is_train=False)
    opt['path'].update(pretrain_network_g=str(path), param_key_g='params_ema', strict_load_g=strict)
    model = ESCSRModel(opt)
    resampled = {k: v.clone() for k, v in x2.state_dict().items()}
    resample_subpixel_conv(resampled, '', 3, SCALE)
    assert model.net_g.to_img.weight.shape[0] == 3 * SCALE**2
    torch.testing.assert_close(model.net_g.state_dict()['to_img.weight'], resampled['to_img.weight'])
    torch.testing.assert_close(model.net_g.state_dict()['proj.weight'], x2.state_dict()['proj.weight'])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / 'net_g_1.pth'
    atomic_torch_save({'params': {'w': torch.ones(2)}}, str(target))
    real_save = torch.save

    def dies_halfway(obj, file, *args, **kwargs):
        with open(file, 'wb') as handle:
            handle.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(OSError, match='disk full'):
        atomic_torch_save({'params': {'w': torch.zeros(2)}}, str(target))
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.load(target, weights_only=True)['params']['w'].tolist() == [1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ['net_g_1.pth']  # no temp file left


def test_a_save_on_a_full_disk_is_retried_then_given_up(tmp_path):
    # torch.save says a failed write with a RuntimeError ('unexpected pos', 'iostream error'): the
    # retries caught OSError only, so a full disk ended training with a traceback
    import logging

    from basicsr.utils import get_root_logger
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    get_root_logger().addHandler(handler)
    target = tmp_path / 'net_g_2.pth'
    try:
        with file_size_limit(20_000):
            with pytest.raises(OSError, match=r'cannot write .*net_g_2.pth: the write failed, is the disk full\?'):
                atomic_torch_save({'params': {'w': torch.zeros(100_000)}}, str(target))
            assert ESCSRModel._save_with_retry({'params': {'w': torch.zeros(100_000)}}, str(target), tries=2) is False
    finally:
        get_root_logger().removeHandler(handler)
    assert len(said) == 3 and 'try 2 of 2' in said[1] and said[2].startswith('Giving up on saving')
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_environment_failures_inside_the_pipeline_are_one_line(tmp_path):
    # BasicSR's own steps (making experiments/<name>, ...) failing on the machine: was a traceback
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, name='n' * 300)  # longer than a file name may be
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'long.yml', opt), cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == \
        f'basicsr train: error: File name too long: {tmp_path / "experiments" / ("n" * 300)}'
    from esc_arch.messages import environment_problem
    assert environment_problem(MemoryError()) == 'out of memory (MemoryError)'
    assert environment_problem(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                                            "memory: you tried to allocate 1 bytes")).startswith('out of memory: ')
    assert environment_problem(RuntimeError('mat1 and mat2 shapes cannot be multiplied')) is None  # a bug: traceback


def test_stale_temp_files_are_recognised_and_only_they_are_removed(tmp_path):
    from esc_arch.fileio import atomic_path, remove_stale_temp_files
    temps = []
    for name in ('13.state', 'net_g_13.pth', 'net_g_latest.pth', 'out.png'):
        with atomic_path(tmp_path / name) as tmp:  # the names a kill mid-write would leave behind
            temps.append(os.path.basename(tmp))
            shutil.copy(tmp, tmp_path / ('kept_' + os.path.basename(tmp)))
    assert all(is_temp_name(name) for name in temps)
    kept = ['13.state', 'net_g_13.pth', 'net_g_latest.pth', '.hidden', 'notes.tmp.txt.bak', '2.state']
    for name in kept:
        (tmp_path / name).write_bytes(b'x')
        assert not is_temp_name(name)
    for name in temps:
        os.replace(tmp_path / ('kept_' + name), tmp_path / name)
    assert remove_stale_temp_files(tmp_path) == sorted(temps)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ['out.png'])
    assert saved_iterations(str(tmp_path)) == [2, 13]


def saved_run(root: Path, iteration: int, epoch: int) -> tuple[Path, Path]:
    """training_states/ and models/ of a run that saved ``iteration`` (a state and its tiny ESC network)."""
    states, models = root / 'training_states', root / 'models'
    states.mkdir()
    models.mkdir()
    atomic_torch_save({'epoch': epoch, 'iter': iteration, 'optimizers': [], 'schedulers': []},
                      str(states / f'{iteration}.state'))
    net = {k: v for k, v in TINY_ESC.items() if k != 'type'}
    atomic_torch_save({'params': ESC(**net).state_dict()}, str(models / f'net_g_{iteration}.pth'))
    return states, models


def test_auto_resume_skips_an_unreadable_newest_state(tmp_path, capsys):
    from esc_arch.commands._pipeline import load_resume_state
    states, models = saved_run(tmp_path, 2, epoch=0)
    (states / '4.state').write_bytes(b'truncated by a crash')  # e.g. written by a non-atomic save
    opt = dict(auto_resume=True, num_gpu=0, network_g=dict(TINY_ESC),
               path=dict(training_states=str(states), models=str(models), resume_state=None))
    state = load_resume_state(opt)
    assert state['iter'] == 2 and opt['path']['resume_state'] == str(states / '2.state')
    assert opt['path']['pretrain_network_g'] == str(models / 'net_g_2.pth')
    assert '4.state' in capsys.readouterr().out


def test_resuming_a_state_past_total_iter_or_at_it_over_a_newer_network_is_one_line(tmp_path):
    # a run to 10 saved 8.state and net_g_latest.pth (iteration 10); --auto_resume with total_iter 6
    # trained nothing, overwrote net_g_latest.pth with iteration 8's network and validated it as '@ 6 iter'
    from esc_arch.commands._pipeline import OptionError, load_resume_state
    states, models = saved_run(tmp_path, 8, epoch=3)
    opt = dict(auto_resume=True, num_gpu=0, network_g=dict(TINY_ESC), train=dict(total_iter=6),
               path=dict(training_states=str(states), models=str(models), resume_state=None))
    with pytest.raises(OptionError, match=rf'^cannot resume from {re.escape(str(states / "8.state"))}: it is at '
                                          r'iteration 8, past train.total_iter 6 .*raise total_iter to train on'):
        load_resume_state(copy.deepcopy(opt))
    for total in (8, 10):  # at total_iter (nothing left to train: net_g_latest.pth is its network) or before
        opt['train']['total_iter'] = total
        assert load_resume_state(copy.deepcopy(opt))['iter'] == 8
    # at total_iter, where net_g_latest.pth holds another network (a longer run's end): it would be lost
    net = ESC(**{k: v for k, v in TINY_ESC.items() if k != 'type'}).state_dict()
    atomic_torch_save({'params': {k: v + 1 for k, v in net.items()}}, str(models / 'net_g_latest.pth'))
    opt['train']['total_iter'] = 8
    with pytest.raises(OptionError, match=r'it is at iteration 8, train.total_iter, so nothing would be trained and '
                                          r'.*net_g_latest.pth, which holds another network'):
        load_resume_state(copy.deepcopy(opt))
    opt['train']['total_iter'] = 10
    assert load_resume_state(copy.deepcopy(opt))['iter'] == 8  # training on replaces it, as asked
    shutil.copy(models / 'net_g_8.pth', models / 'net_g_latest.pth')  # the state's own network: run again, fine
    opt['train']['total_iter'] = 8
    assert load_resume_state(copy.deepcopy(opt))['iter'] == 8


def test_more_option_mistakes_are_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_pairs(tmp_path / 'data')

    def error_for(name, change, command='train'):
        opt = train_options(data)
        change(opt)
        code, err = run_cli(capsys, command, '-opt', write_yaml(tmp_path / f'{name}.yml', opt))
        assert code == 2 and err.count('\n') == 0 and f'{name}.yml' in err, (name, err)
        return err

    assert 'network_g.upscaling_factor is 2 but scale is 4' in error_for(
        'netscale', lambda o: o['network_g'].update(upscaling_factor=2))
    # what only the constructor checks, and the authors' options this package does not build
    assert 'ESCReal: use_dysample: true (a DySample upsampler) is not supported' in error_for(
        'dysample', lambda o: o.update(network_g=dict(TINY_ESC, type='ESCReal', use_dysample=True)))
    assert 'ESC: dim (16) must be divisible by num_heads (3)' in error_for(
        'heads', lambda o: o['network_g'].update(num_heads=3))
    assert 'ESC: flashbias_rank (16) is for attn_type FlashBias only' in error_for(
        'flashbias', lambda o: o['network_g'].update(flashbias_rank=16))
    (tmp_path / 'victim').mkdir()  # a name with '/': BasicSR archived (renamed) this folder of the user's
    for bad in ('../victim', '', 7):
        assert 'name must be a folder name' in error_for(f'name{bad!s:.1}', lambda o, bad=bad: o.update(name=bad))
    assert (tmp_path / 'victim').is_dir() and not (tmp_path / 'experiments').exists()
    assert 'network_g (EDSR) upscales x4 (upscale defaults to 4) but scale is 2' in error_for(  # a shape error later
        'netdefault', lambda o: (o.update(scale=2), o.update(network_g=dict(type='EDSR', num_in_ch=3, num_out_ch=3))))
    assert "unknown metric 'calculate_pnsr'" in error_for(
        'metric', lambda o: o['val']['metrics']['psnr'].update(type='calculate_pnsr'))
    assert "unknown loss 'L2Loss'" in error_for('loss', lambda o: o['train']['pixel_opt'].update(type='L2Loss'))
    assert "unknown scheduler 'Cosine'" in error_for('sched', lambda o: o['train']['scheduler'].update(type='Cosine'))
    err = error_for('optim', lambda o: o['train']['optim_g'].update(type='adamw'))
    assert "unknown optimizer 'adamw'" in err and 'AdamW' in err
    assert 'train.total_iter must be a positive whole number' in error_for(
        'noiter', lambda o: o['train'].pop('total_iter'))
    assert "got '4'" in error_for('striter', lambda o: o['train'].update(total_iter='4'))
    assert 'train.optim_g.lr must be a number' in error_for('strlr', lambda o: o['train']['optim_g'].update(lr='x'))
    (tmp_path / 'empty').mkdir()
    empty = str(tmp_path / 'empty')
    assert 'no images in' in error_for('empty', lambda o: o['datasets']['val'].update(dataroot_lq=empty))
    odd = tmp_path / 'odd_lr'
    odd.mkdir()
    for index in range(4):  # the right names, 2x instead of 4x
        cv2.imwrite(str(odd / f'{index:03d}.png'), np.zeros((16, 16, 3), np.uint8))
    assert 'GT 32x32 is not x4 its LQ 16x16' in error_for(
        'lqscale', lambda o: o['datasets']['train'].update(dataroot_lq=str(odd)))
    (odd / '003.png').rename(odd / '3.png')
    assert "file(s) in only one of" in error_for(
        'unpaired', lambda o: o['datasets']['train'].update(dataroot_lq=str(odd)))
    assert 'gt_size 64 is larger than 000.png (32x32)' in error_for(
        'patch', lambda o: o['datasets']['train'].update(gt_size=64))
    assert 'make 4 sample(s), fewer than batch_size_per_gpu 8' in error_for(
        'batch', lambda o: o['datasets']['train'].update(batch_size_per_gpu=8))
    wrong = tmp_path / 'wide.pth'  # an ESC of another width as the pretrained network
    torch.save({'params': ESC(**{**{k: v for k, v in TINY_ESC.items() if k != 'type'}, 'dim': 24}).state_dict()},
               wrong)
    assert 'does not fit network_g (ESC)' in error_for(
        'pretrained', lambda o: o['path'].update(pretrain_network_g=str(wrong)))
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    text = str(tmp_path / 'text.pth')
    assert 'not a PyTorch' in error_for('textpth', lambda o: o['path'].update(pretrain_network_g=text))
    assert "ESC: dim must be int, got '16'" in error_for('strdim', lambda o: o['network_g'].update(dim='16'))
    assert 'ESC: use_ln must be bool' in error_for('intln', lambda o: o['network_g'].update(use_ln=1))
    assert not (tmp_path / 'experiments').exists()


def test_train_keys_at_the_top_level_are_named(tmp_path, capsys):
    # a fork's top-level `use_amp: true` (or grad_clip put beside train:) trained in fp32 without a word
    from esc_arch.commands._pipeline import _warn_top_level_train_keys
    opt = train_options(tmp_path)
    opt.update(use_amp=True, grad_clip=0.1, manual_seed=3)
    _warn_top_level_train_keys(opt)
    assert capsys.readouterr().err.splitlines() == [
        'warning: use_amp at the top level is not an option ESCSRModel reads; it is ignored '
        '(set train.amp: bf16 or fp16 instead)',
        'warning: grad_clip at the top level is not an option ESCSRModel reads; it is ignored '
        '(set train.grad_clip instead)']
    opt.update(model_type='RealHATGANModel')  # the GAN stage reads neither amp nor grad_clip, but optim_d
    opt.update(optim_d={'type': 'Adam'})
    _warn_top_level_train_keys(opt)
    assert capsys.readouterr().err.splitlines() == [
        'warning: optim_d at the top level is not an option RealHATGANModel reads; it is ignored '
        '(set train.optim_d instead)']


def test_misspelt_train_and_val_keys_are_named(tmp_path, capsys):
    from esc_arch.commands._pipeline import TRAIN_KEYS, VAL_KEYS, _warn_unread_keys
    opt = train_options(tmp_path, gradclip=0.01, amp_mode='bf16')
    _warn_unread_keys(opt, 'train', TRAIN_KEYS)
    err = capsys.readouterr().err
    assert 'train.gradclip is not an option ESCSRModel reads; it is ignored (did you mean grad_clip?)' in err
    assert 'train.amp_mode' in err and 'train.ema_decay' not in err and 'train.optim_g' not in err
    opt['val']['metric'] = opt['val'].pop('metrics')  # validation would run with no metrics at all
    _warn_unread_keys(opt, 'val', VAL_KEYS)
    err = capsys.readouterr().err
    assert err.strip() == 'warning: val.metric is not an option ESCSRModel reads; it is ignored (did you mean metrics?)'


def test_yaml_exponent_numbers_and_force_yml_values(tmp_path):
    from esc_arch.commands._pipeline import OptionError, load_options
    path = tmp_path / 'o.yml'
    path.write_text('name: run\ntrain:\n  optim_g:\n    lr: 1e-3\n    eps: -2.5E+2\n  total_iter: 1e3\n  tag: 1e3x\n')
    opt = load_options(str(path))
    assert opt['train']['optim_g'] == {'lr': 1e-3, 'eps': -250.0}  # PyYAML alone keeps '1e-3' a string
    assert opt['train']['total_iter'] == 1000.0 and opt['train']['tag'] == '1e3x'
    opt = load_options(str(path), ['name=nan', 'train:total_iter=2e4', 'train:tag=1_000'])
    assert opt['name'] == 'nan' and opt['train']['total_iter'] == 2e4 and opt['train']['tag'] == '1_000'
    opt = load_options(str(path), ['train:tag=-1', 'train:total_iter=+2', 'train:optim_g:eps=-0.5'])
    assert [type(opt['train'][k]) for k in ('tag', 'total_iter')] == [int, int]  # were -1.0 and 2.0
    assert opt['train']['tag'] == -1 and opt['train']['optim_g']['eps'] == -0.5
    opt = load_options(str(path), ['train:tag=null', 'name=NULL', 'train:total_iter=nullable'])  # was 'null'
    assert opt['train']['tag'] is None and opt['name'] is None and opt['train']['total_iter'] == 'nullable'
    for bad in ('=4', 'train:=4', 'train:optim_g:lr=[1,2'):
        with pytest.raises(OptionError, match='--force_yml') as info:
            load_options(str(path), [bad])
        assert '\n' not in str(info.value)


def test_resume_checks_the_state_against_the_options(tmp_path, capsys):
    from esc_arch.commands._pipeline import OptionError, load_resume_state
    states, models = tmp_path / 'training_states', tmp_path / 'models'
    states.mkdir()
    models.mkdir()
    net = {k: v for k, v in TINY_ESC.items() if k != 'type'}
    model = ESC(**net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10])  # sets initial_lr, as BasicSR's
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()  # its state: exp_avg, exp_avg_sq, step
    for it in (2, 4):
        atomic_torch_save({'epoch': 0, 'iter': it, 'optimizers': [optimizer.state_dict()], 'schedulers': []},
                          str(states / f'{it}.state'))
        atomic_torch_save({'params': model.state_dict()}, str(models / f'net_g_{it}.pth'))

    def options(**changes):
        opt = dict(auto_resume=True, num_gpu=0, network_g=dict(TINY_ESC),
                   train=dict(optim_g=dict(type='AdamW', lr=5e-4)),
                   path=dict(training_states=str(states), models=str(models), resume_state=None))
        for key, value in changes.items():
            opt[key].update(value)
        return opt

    with pytest.raises(OptionError, match=r'4\.state .* does not fit network_g \(ESC\): .*shape mismatch'):
        load_resume_state(options(network_g=dict(dim=24)))
    with pytest.raises(OptionError, match='saved with another optimizer than train.optim_g SGD'):
        load_resume_state(options(train=dict(optim_g=dict(type='SGD', lr=0.1, momentum=0.9))))
    # settings that are a subset of AdamW's: Adamax failed in torch (KeyError: 'exp_inf'), Adam resumed
    with pytest.raises(OptionError, match=r'another optimizer than train.optim_g Adamax \(its state holds exp_avg, '
                       r'exp_avg_sq, step, Adamax keeps exp_avg, exp_inf, step\)'):
        load_resume_state(options(train=dict(optim_g=dict(type='Adamax', lr=5e-4))))
    with pytest.raises(OptionError, match=r'another optimizer than train.optim_g Adam \(decoupled_weight_decay differ'):
        load_resume_state(options(train=dict(optim_g=dict(type='Adam', lr=5e-4))))
    assert load_resume_state(options(train=dict(optim_g=dict(type='AdamW', lr=1e-3))))['iter'] == 4
    assert 'the learning rate follows the saved schedule (base lr 0.0005)' in capsys.readouterr().out
    (models / 'net_g_4.pth').write_bytes((models / 'net_g_4.pth').read_bytes()[:1000])  # truncated network
    opt = options()
    assert load_resume_state(opt)['iter'] == 2 and opt['path']['resume_state'] == str(states / '2.state')
    assert 'net_g_4.pth' in capsys.readouterr().out
    opt = options()
    opt.update(auto_resume=False)
    opt['path']['resume_state'] = str(states / '4.state')  # named explicitly: no fallback, one line
    with pytest.raises(OptionError, match=r'cannot resume from .*4\.state: .*truncated or corrupt'):
        load_resume_state(opt)


def test_resume_from_a_state_of_another_model_is_one_line(tmp_path):
    # the MSE stage resumed from a GAN run's state (optim_g and optim_d), or the other way round, was
    # BasicSR's "AssertionError: Wrong lengths of optimizers" after the set-up
    from basicsr.archs.discriminator_arch import UNetDiscriminatorSN

    from esc_arch.commands._pipeline import OptionError, load_resume_state
    states, models = tmp_path / 'training_states', tmp_path / 'models'
    states.mkdir()
    models.mkdir()
    model = ESC(**{k: v for k, v in TINY_ESC.items() if k != 'type'})
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    atomic_torch_save({'params': model.state_dict()}, str(models / 'net_g_2.pth'))
    net_d = dict(type='UNetDiscriminatorSN', num_in_ch=3, num_feat=4)
    atomic_torch_save({'params': UNetDiscriminatorSN(3, num_feat=4).state_dict()}, str(models / 'net_d_2.pth'))
    adam = dict(type='AdamW', lr=5e-4)

    def resume(count, **opt):
        atomic_torch_save({'epoch': 0, 'iter': 2, 'optimizers': [optimizer.state_dict()] * count,
                           'schedulers': []}, str(states / '2.state'))
        return load_resume_state(dict(opt, auto_resume=True, num_gpu=0, network_g=dict(TINY_ESC),
                                      path=dict(training_states=str(states), models=str(models), resume_state=None)))

    with pytest.raises(OptionError, match=r'cannot resume from \S+2\.state: it holds the states of 2 optimizer\(s\), '
                                          r'but RealHATMSEModel trains 1 \(optim_g\): it was saved by another model'):
        resume(2, model_type='RealHATMSEModel', train=dict(optim_g=adam))
    with pytest.raises(OptionError, match=r'it holds the states of 1 optimizer\(s\), but RealHATGANModel trains 2 '
                                          r'\(optim_g, optim_d\)'):
        resume(1, model_type='RealHATGANModel', network_d=net_d, train=dict(optim_g=adam, optim_d=adam))
    assert resume(1, model_type='RealHATMSEModel', train=dict(optim_g=adam))['iter'] == 2
    assert resume(2, model_type='RealHATGANModel', network_d=net_d, train=dict(optim_g=adam, optim_d=adam))['iter'] == 2


class _Draws(torch.utils.data.Dataset):
    """What an augmenting data set draws per sample (BasicSR's crops use random, flips NumPy)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import random
        return torch.tensor([np.random.rand(), random.random()], dtype=torch.float64)


def test_loader_workers_draw_new_augmentations_every_epoch():
    # BasicSR's worker_init_fn seeds every epoch's new workers alike: the same crops and flips again
    from functools import partial

    from basicsr.data import worker_init_fn

    from esc_arch.commands._pipeline import _WorkerInit

    def two_epochs(seed):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(_Draws(), batch_size=2, num_workers=2, worker_init_fn=_WorkerInit(
            partial(worker_init_fn, num_workers=2, rank=0, seed=seed)))
        return [torch.cat(list(loader)) for _ in range(2)]

    first, second = two_epochs(10)
    assert not torch.equal(first, second)
    assert not torch.equal(first[:2], first[2:])  # the two workers' draws differ
    again = two_epochs(10)  # and manual_seed still fixes them
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert not torch.equal(first, two_epochs(11)[0])


def test_training_reaches_total_iter_on_a_small_data_set(tmp_path):
    # 4 pairs in batches of 3: BasicSR counts ceil(4 / 3) = 2 iterations per epoch, its loader
    # (drop_last) makes 1, so 5 iterations would have stopped after 3
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, total_iter=5, warmup_iter=-1)
    opt['datasets']['train'].update(batch_size_per_gpu=3, prefetch_mode='cuda')  # the authors' files ask for it
    opt['logger']['save_checkpoint_freq'] = 100
    opt['val']['val_freq'] = 100
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'small.yml', opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]  # BasicSR's CUDA prefetcher failed on a CPU run
    assert 'tiny: prefetch_mode cuda needs a GPU; using the plain loader.' in result.stdout
    log = newest_log(tmp_path / 'experiments' / 'tiny')
    assert re.search(r'iter:\s+5,', log) and not re.search(r'iter:\s+6,', log)
    # the validation after the loop is labelled total_iter (BasicSR passes its counter, 6)
    assert re.findall(r'Best: [\d.]+ @ (\d+) iter', log) == ['5']
    assert re.search(r'iter:\s+5, .*\[eta: 0:00:00, ', log) and '-1 day' not in log  # BasicSR's said -1 day, 23:59:59


def test_a_run_resumed_with_a_smaller_batch_size_trains_to_total_iter(tmp_path):
    # batches of 4 (one iteration per epoch) saved iteration 8 at epoch 7; in batches of 2, 10
    # iterations count 5 epochs, so BasicSR's epoch loop (from 7 to 5) trained nothing and ended at 8
    data = make_pairs(tmp_path / 'data')
    opt = train_options(data, total_iter=8, warmup_iter=-1)
    opt['datasets']['train']['batch_size_per_gpu'] = 4
    opt['logger']['save_checkpoint_freq'] = 8
    opt['val']['val_freq'] = 100
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'big.yml', opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    opt['datasets']['train']['batch_size_per_gpu'] = 2
    opt['train']['total_iter'] = 10
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'small.yml', opt), '--auto_resume', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = newest_log(tmp_path / 'experiments' / 'tiny')
    assert 'Resuming training from epoch: 7, iter: 8.' in log
    assert re.search(r'iter:\s+10,', log) and not re.search(r'iter:\s+11,', log)
    assert saved_iterations(tmp_path / 'experiments' / 'tiny' / 'training_states') == [8]


def test_flashbias_fine_tune_from_a_table_checkpoint_then_test(tmp_path):
    # the authors' ESC_FB recipe: a FlashBias network starts from a released table-layout model
    # (strict_load_g true), its tables factored by SVD as they load; then basicsr test on the result
    data = make_pairs(tmp_path / 'data')
    table = {k: v for k, v in TINY_ESC.items() if k != 'type'}
    torch.save({'params_ema': randomize_(ESC(**table), scale=0.1).state_dict()}, tmp_path / 'table.pth')
    opt = train_options(data, name='fb', total_iter=2, warmup_iter=-1)
    opt['network_g'].update(attn_type='FlashBias', flashbias_rank=4)
    opt['path'].update(pretrain_network_g=str(tmp_path / 'table.pth'), param_key_g='params_ema')
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'fb.yml', opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / 'experiments' / 'fb'
    log = newest_log(experiment)
    assert re.search(r'Decomposed blocks\.0\.attn\.relative_position_bias into rank-4 FlashBias factors '
                     r'\(relative error \d\.\d\de-\d\d\)', log)
    trained = torch.load(experiment / 'models' / 'net_g_2.pth', weights_only=True)['params_ema']
    assert trained['blocks.0.attn.flashbias_q'].shape == (2, 16, 4) and not any('relative' in k for k in trained)
    test_opt = {k: v for k, v in opt.items() if k != 'train'}
    test_opt.update(name='fb_test', datasets=dict(test_1=opt['datasets']['val']))
    test_opt['path'] = dict(pretrain_network_g=str(experiment / 'models' / 'net_g_2.pth'), param_key_g='params_ema')
    result = basicsr('test', '-opt', write_yaml(tmp_path / 'fb_test.yml', test_opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r'# psnr: \d+\.\d+', newest_log(tmp_path / 'results' / 'fb_test'))


def test_a_corrupt_training_image_is_named(tmp_path):
    data = make_pairs(tmp_path / 'data')
    (data / 'lr' / '002.png').write_bytes((data / 'lr' / '002.png').read_bytes()[:60])  # truncated PNG
    opt = train_options(data, total_iter=8)
    opt['datasets']['train'].update(batch_size_per_gpu=1, num_worker_per_gpu=1)  # through a worker process
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'corrupt.yml', opt), cwd=tmp_path)
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    assert err[-1].startswith('basicsr train: error: cannot read an image of ') and '002.png' in err[-1], err[-5:]
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('kind', ['PairedImageDataset', 'RealESRGANDataset'])
def test_a_training_image_gone_after_the_checks_is_tried_again_then_named(tmp_path, monkeypatch, kind):
    # a file that cannot be read mid-run failed PairedImageDataset with a traceback; RealESRGANDataset
    # read another file at random instead, randint(0, len) (an IndexError one time in len + 1), and
    # failed with UnboundLocalError after three
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from basicsr.data.realesrgan_dataset import RealESRGANDataset

    from esc_arch.commands import _pipeline
    _pipeline._patch_image_datasets()
    slept = []
    monkeypatch.setattr(time, 'sleep', slept.append)
    if kind == 'PairedImageDataset':
        data = make_pairs(tmp_path / 'data')
        dataset = PairedImageDataset(dict(paired('tiny', data), phase='train', scale=SCALE, gt_size=16,
                                          use_hflip=False, use_rot=False))
        gone = data / 'hr' / '000.png'
    else:
        dataset = RealESRGANDataset(real_options(tmp_path, 'train_ESC_Real_x4_MSE.yml')['datasets']['train'])
        gone = tmp_path / 'gt' / '0.png'
    assert dataset[0]['gt'].shape[0] == 3
    gone.unlink()
    for _ in range(5):  # RealESRGANDataset's random pick would hit the other file or the list's end
        with pytest.raises(_pipeline.ImageDecodeError) as raised:
            dataset[0]
        assert str(raised.value).startswith('cannot read an image of ') and str(gone) in str(raised.value)
        assert str(raised.value).endswith(': No such file or directory (tried 3 times, 1 s apart)')
    assert slept.count(1) >= 10  # two waits per image read
    assert dataset[1]['gt'].shape[0] == 3  # the others still read


def test_pre_checks_accept_what_basicsr_accepts_and_refuse_what_it_fails_on(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_pairs(tmp_path / 'data')
    from esc_arch.commands._pipeline import OptionError, check_options

    def check(change, is_train=True):
        opt = train_options(data)
        change(opt)
        check_options(opt, 'x.yml', is_train, argparse.Namespace(auto_resume=False, launcher='none', debug=False))

    # accepted: BasicSR's _basicsr-suffixed names, a validation GT larger than LQ x scale (BasicSR
    # crops it), an LMDB's leftover meta_info_file (BasicSR reads the LMDB's own)
    # (high_order_degradation false: it trains on the paired set's own LQ images, reading no degradation keys)
    check(lambda o: (o.update(model_type='RealESRNetModel', high_order_degradation=False), o['train'].update(
        optim_g=dict(type='Adam', lr=2e-4, betas=[0.9, 0.99]))))  # BasicSR's own models build Adam only
    capsys.readouterr()
    # the authors' ESC-Real MSE file keeps its GAN run's optim_d (AdamW, which RealESRNetModel could not
    # build): it has no network_d, so it never reads optim_d ("cannot be built for RealESRNetModel")
    check(lambda o: (o.update(model_type='RealESRNetModel', high_order_degradation=False), o['train'].update(
        optim_g=dict(type='Adam', lr=2e-4), optim_d=dict(type='AdamW', lr=5e-4, weight_decay=0))))
    assert 'warning: train.optim_d is not used: there is no network_d' in capsys.readouterr().err
    big = tmp_path / 'big_hr'
    big.mkdir()
    for index in range(4):
        cv2.imwrite(str(big / f'{index:03d}.png'), np.zeros((33, 34, 3), np.uint8))
    check(lambda o: o['datasets']['val'].update(dataroot_gt=str(big)))
    # a YAML key left empty (null): BasicSR's augment takes it as off
    check(lambda o: o['datasets']['train'].update(use_hflip=None, use_rot=None))
    # SingleImageDataset joins each meta_info_file line (up to its first space) to dataroot_lq:
    # images in subfolders are read
    nested = tmp_path / 'nested'
    (nested / 'sub').mkdir(parents=True)
    for index in range(2):
        cv2.imwrite(str(nested / 'sub' / f'{index}.png'), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / 'nested.txt').write_text('sub/0.png (8,8,3)\nsub/1.png\n')
    check(lambda o: (o['datasets'].update(val=dict(name='single', type='SingleImageDataset', dataroot_lq=str(nested),
                                                   io_backend=dict(type='disk'),
                                                   meta_info_file=str(tmp_path / 'nested.txt'))),
                     o['val'].pop('metrics')))
    with pytest.raises(OptionError, match='is not x4'):
        check(lambda o: o['datasets']['train'].update(dataroot_gt=str(big)))  # training pairs must be exact
    lmdbs = {}
    for side, size in (('gt', 32), ('lq', 8)):  # what basicsr prepare writes next to data.mdb
        lmdbs[side] = tmp_path / f'{side}.lmdb'
        write_lmdb(lmdbs[side], ''.join(f'{i:03d}.png ({size},{size},3) 1\n' for i in range(4)))
    check(lambda o: o['datasets']['val'].update(io_backend=dict(type='lmdb'), dataroot_gt=str(lmdbs['gt']),
                                                dataroot_lq=str(lmdbs['lq']), meta_info_file='basicsr/meta_info.txt'))
    for side, size in (('gt', 32), ('lq', 8)):  # names with spaces (BasicSR keys them up to the first dot)
        write_lmdb(lmdbs[side], ''.join(f'my img_s{i:03d}.png ({size},{size},3) 1\n' for i in range(4)))
    check(lambda o: o['datasets']['train'].update(io_backend=dict(type='lmdb'), dataroot_gt=str(lmdbs['gt']),
                                                  dataroot_lq=str(lmdbs['lq'])))
    # RealESRGANPairedDataset on LMDBs reads their pairs (BasicSR's paired_paths_from_lmdb), not a
    # leftover meta_info (read on disk only): the LMDB pairs are checked, the list is not read
    real_lmdb = dict(type='RealESRGANPairedDataset', io_backend=dict(type='lmdb'), dataroot_gt=str(lmdbs['gt']),
                     dataroot_lq=str(lmdbs['lq']), meta_info='basicsr/meta_info.txt')
    check(lambda o: o['datasets']['train'].update(real_lmdb))
    write_lmdb(lmdbs['lq'], ''.join(f'my img_s{i:03d}.png (9,9,3) 1\n' for i in range(4)))
    with pytest.raises(OptionError, match='GT 32x32 is not x4 its LQ 9x9'):
        check(lambda o: o['datasets']['train'].update(real_lmdb))
    # a phone photo: stored 40 wide and 32 high with EXIF orientation 6, which OpenCV (so BasicSR)
    # decodes turned, 32 wide and 40 high; its LQ made from that decode is 8 x 10
    from PIL import Image
    turned = tmp_path / 'turned'
    (turned / 'hr').mkdir(parents=True)
    (turned / 'lr').mkdir()
    photo = Image.fromarray(np.zeros((32, 40, 3), np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(turned / 'hr' / 'p.jpg', exif=exif.tobytes())
    assert cv2.imread(str(turned / 'hr' / 'p.jpg')).shape[:2] == (40, 32)
    cv2.imwrite(str(turned / 'lr' / 'p.jpg'), np.zeros((10, 8, 3), np.uint8))
    check(lambda o: o['datasets']['val'].update(dataroot_gt=str(turned / 'hr'), dataroot_lq=str(turned / 'lr')))
    capsys.readouterr()
    check(lambda o: o['path'].update(experiments_root='elsewhere'))
    assert "warning: path.experiments_root is set by BasicSR from the run's name" in capsys.readouterr().err
    for side in ('hr', 'lr'):  # a1.png and a1.jpg: BasicSR saves both as a1_<suffix>.png
        cv2.imwrite(str(turned / side / 'p.png'), np.zeros((40, 32) if side == 'hr' else (10, 8), np.uint8))
    check(lambda o: o['datasets']['val'].update(dataroot_gt=str(turned / 'hr'), dataroot_lq=str(turned / 'lr')))
    assert 'warning: p.jpg and p.png save to one output image' not in capsys.readouterr().err  # save_img is off
    check(lambda o: (o['val'].update(save_img=True), o['datasets']['val'].update(
        dataroot_gt=str(turned / 'hr'), dataroot_lq=str(turned / 'lr'))))
    assert 'warning: p.jpg and p.png save to one output image' in capsys.readouterr().err
    check(lambda o: (o['val'].update(save_img=True), o['val'].pop('metrics', None), o['datasets'].update(
        val=dict(name='lq only', type='SingleImageDataset', dataroot_lq=str(turned / 'lr'),
                 io_backend=dict(type='disk')))))  # no GT: BasicSR names the outputs the same way
    assert 'warning: p.jpg and p.png save to one output image' in capsys.readouterr().err
    # two validation sets of one name: one folder of images, one name for their metrics
    check(lambda o: o['datasets'].update(val_2=copy.deepcopy(o['datasets']['val'])))
    assert "warning: datasets.val and datasets.val_2 in x.yml are both named 'tinyval'" in capsys.readouterr().err
    check(lambda o: o['datasets'].update(val_2=dict(copy.deepcopy(o['datasets']['val']), name='other')))
    assert 'both named' not in capsys.readouterr().err
    # refused before training: what BasicSR fails on later
    refused = {
        "SGD.*unexpected keyword argument 'betas'": lambda o: o['train']['optim_g'].update(type='SGD'),
        'cannot be built for SRModel: optimizer AdamW is not supperted': lambda o: o.update(model_type='SRModel'),
        'periods add up to 2, fewer than total_iter 4': lambda o: o['train'].update(
            scheduler=dict(type='CosineAnnealingRestartLR', periods=[2], restart_weights=[1])),
        '2 periods but 1 restart_weights': lambda o: o['train'].update(
            scheduler=dict(type='CosineAnnealingRestartLR', periods=[2, 2], restart_weights=[1])),
        'train.scheduler is missing': lambda o: o['train'].pop('scheduler'),
        'train.optim_g is missing': lambda o: o['train'].pop('optim_g'),
        "train.optim_g must be a mapping of options .* in x.yml, got 'Adam'": lambda o: o[
            'train'].update(optim_g='Adam'),
        'needs a pixel_opt or perceptual_opt': lambda o: o['train'].pop('pixel_opt'),
        'val.val_freq must be a whole number of iterations >= 1, got None': lambda o: o['val'].pop('val_freq'),
    }
    for message, change in refused.items():
        with pytest.raises(OptionError, match=message):
            check(change)
    (data / 'lr' / 'Thumbs.db').write_bytes(b'x')  # BasicSR pairs every file of the two folders
    with pytest.raises(OptionError, match=r'in only one of .*: Thumbs\.db'):
        check(lambda o: None)


def test_every_pair_and_option_basicsr_reads_later_is_checked_first(tmp_path, monkeypatch):
    # each of these was a traceback mid-run (a later pair, the first validation, a milestone),
    # a silent wrong result (a x8 GT cropped for x4 metrics, an EMA stuck at its start, random
    # weights tested) or lost work; each is now one line before the run
    monkeypatch.chdir(tmp_path)
    from esc_arch.commands._pipeline import OptionError, check_options

    def error(change, is_train=True, data_change=None):
        data = make_pairs(tmp_path / f'd{len(list(tmp_path.iterdir()))}')
        if data_change:
            data_change(data)
        opt = train_options(data)
        if not is_train:
            opt['datasets'] = dict(test_1=opt['datasets']['val'])
            opt.pop('train')
        change(opt)
        with pytest.raises(OptionError) as info:
            check_options(opt, 'x.yml', is_train, argparse.Namespace(auto_resume=False, launcher='none', debug=False))
        return str(info.value)

    def png(path, side):
        cv2.imwrite(str(path), np.zeros((side, side, 3), np.uint8))

    keep = lambda o: None  # noqa: E731
    assert '003.png: GT 32x32 is not x4 its LQ 9x9' in error(keep, data_change=lambda d: png(d / 'lr' / '003.png', 9))
    assert 'gt_size 16 is larger than 002.png (12x12)' in error(keep, data_change=lambda d: (
        png(d / 'hr' / '002.png', 12), png(d / 'lr' / '002.png', 3)))
    big = tmp_path / 'x8'
    big.mkdir()
    for index in range(4):
        png(big / f'{index:03d}.png', 64)
    assert 'GT 64x64 is not x4 its LQ 8x8' in error(lambda o: o['datasets']['val'].update(dataroot_gt=str(big)))
    empty = lambda d: (d / 'lr' / '002.png').write_bytes(b'')  # noqa: E731
    assert '002.png: it is empty (0 bytes)' in error(keep, data_change=empty)
    notes = lambda d: [(d / side / 'notes.txt').write_text('x') for side in ('hr', 'lr')]  # noqa: E731
    assert 'notes.txt: neither PIL nor OpenCV can read it as an image' in error(keep, data_change=notes)
    meta = tmp_path / 'meta.txt'
    meta.write_text('000.png (32,32,3)\n007.png (32,32,3)\n')
    assert '007.png: it does not exist' in error(lambda o: o['datasets']['train'].update(meta_info_file=str(meta)))
    meta.write_text('000.png (32,32,3)\n\n001.png (32,32,3)\n')  # said 'cannot use .../hr/: it does not exist'
    assert 'meta_info_file ' + f'{meta}, line 2: a blank line' in error(
        lambda o: o['datasets']['train'].update(meta_info_file=str(meta)))
    meta.write_text('000.png (32,32,3)\n')
    assert '1 training image(s) x dataset_enlarge_ratio make 1 sample(s), fewer than batch_size_per_gpu 2' in error(
        lambda o: o['datasets']['train'].update(meta_info_file=str(meta)))
    # SingleImageDataset joins every meta_info_file line to dataroot_lq: a blank one is the folder
    # itself (BasicSR fails reading it mid-validation), an empty list validates nothing
    def single(text):
        def change(o):
            meta.write_text(text)
            o['datasets']['val'] = dict(name='single', type='SingleImageDataset', io_backend=dict(type='disk'),
                                        dataroot_lq=o['datasets']['val']['dataroot_lq'], meta_info_file=str(meta))
            o['val'].pop('metrics')
        return change

    assert 'line 2: a blank line, which BasicSR reads as an image path' in error(single('000.png\n\n001.png\n'))
    assert 'lists no images' in error(single(''))
    assert '007.png: it does not exist' in error(single('000.png (8,8,3)\n007.png\n'))
    assert "filename_tmpl '{}_x4': 000_x4.png is not in lq_paths" in error(
        lambda o: o['datasets']['train'].update(filename_tmpl='{}_x4'))
    # LMDBs, by their meta_info.txt
    lmdbs = {}
    for side, size, count in (('gt', 32, 4), ('lq', 8, 4), ('lq2', 16, 4), ('lq3', 8, 3)):
        lmdbs[side] = tmp_path / f'{side}.lmdb'
        write_lmdb(lmdbs[side], ''.join(f'{i:03d}.png ({size},{size},3) 1\n' for i in range(count)))

    def lmdb(gt='gt', lq='lq', **extra):
        return lambda o: o['datasets']['train'].update(io_backend=dict(type='lmdb'), dataroot_gt=str(lmdbs[gt]),
                                                      dataroot_lq=str(lmdbs.get(lq, lq)), **extra)
    assert 'gt_size 48 is larger than 000 (32x32) and 3 more of the 4 pairs' in error(lmdb(gt_size=48))
    assert '000: GT 32x32 is not x4 its LQ 16x16' in error(lmdb(lq='lq2'))
    assert '1 key(s) in only one of the two LMDBs, e.g. 003' in error(lmdb(lq='lq3'))  # was a KeyError
    assert f'no images in {lmdbs["gt"]} (dataroot_gt of datasets.train in x.yml; an LMDB needs io_backend: ' \
        '{type: lmdb})' in error(lambda o: o['datasets']['train'].update(dataroot_gt=str(lmdbs['gt']),
                                                                          dataroot_lq=str(lmdbs['lq'])))
    wide = lambda d: [cv2.imwrite(str(d / side / f'{i:03d}.png'), np.zeros((h, 2 * h, 3), np.uint8))  # noqa: E731
                      for side, h in (('hr', 32), ('lr', 8)) for i in range(4)]
    assert 'gt_size 48 is larger than 000.png (64x32)' in error(  # its short side
        lambda o: o['datasets']['train'].update(gt_size=48), data_change=wide)
    # torchrun's processes share the pairs: each has fewer than a batch
    with pytest.MonkeyPatch.context() as env:
        env.setenv('WORLD_SIZE', '2')
        env.setenv('RANK', '0')
        data = make_pairs(tmp_path / 'world')
        opt = train_options(data)
        opt['datasets']['train']['batch_size_per_gpu'] = 3
        with pytest.raises(OptionError, match=r'make 2 sample\(s\) per process \(2 processes\), fewer than '
                                              r'batch_size_per_gpu 3'):
            check_options(opt, 'x.yml', True, argparse.Namespace(auto_resume=False, launcher='pytorch', debug=False))
    assert 'both dataroot_gt and dataroot_lq must be .lmdb folders' in error(lmdb(lq=str(tmp_path)))
    # data-set, scheduler, EMA and metric options
    train = lambda **kw: lambda o: o['datasets']['train'].update(**kw)  # noqa: E731
    assert 'needs the option(s) dataroot_gt (did you mean dataroot_GT?)' in error(
        lambda o: o['datasets']['train'].update(dataroot_GT=o['datasets']['train'].pop('dataroot_gt')))
    assert 'needs the option(s) gt_size (did you mean gt_szie?)' in error(
        lambda o: o['datasets']['train'].update(gt_szie=o['datasets']['train'].pop('gt_size')))
    assert "batch_size_per_gpu must be a whole number >= 1, got '2'" in error(train(batch_size_per_gpu='2'))
    assert "gt_size must be a whole number of pixels, got '16'" in error(train(gt_size='16'))
    assert 'gt_size must be a whole number of pixels, got 0' in error(train(gt_size=0))  # an empty crop
    assert 'gt_size 18 is not a multiple of scale 4' in error(train(gt_size=18))
    assert "scale must be a whole number >= 1 in x.yml, got '4'" in error(lambda o: o.update(scale='4'))
    sched = lambda **kw: lambda o: o['train']['scheduler'].update(**kw)  # noqa: E731
    assert 'milestones must be a list of whole numbers, got 3' in error(sched(milestones=3))
    assert "gamma must be a number, got '0.5'" in error(sched(gamma='0.5'))
    assert 'unknown option(s) milestone; missing option(s) milestones' in error(
        lambda o: o['train']['scheduler'].update(milestone=o['train']['scheduler'].pop('milestones')))
    assert 'train.ema_decay must be below 1' in error(lambda o: o['train'].update(ema_decay=1.0))
    psnr = lambda **kw: lambda o: o['val']['metrics']['psnr'].update(**kw)  # noqa: E731
    assert 'calculate_psnr: unknown option(s) crop_boder; missing option(s) crop_border' in error(
        lambda o: o['val']['metrics']['psnr'].update(crop_boder=o['val']['metrics']['psnr'].pop('crop_border')))
    assert "crop_border must be a whole number >= 0, got '2'" in error(psnr(crop_border='2'))
    assert "test_y_channel must be true or false, got 'false'" in error(psnr(test_y_channel='false'))
    # NIQE needs two 96x96 blocks of each output (BasicSR: min() of an empty tensor, or SVD did not converge)
    assert re.search(r'val.metrics.niqe \(calculate_niqe\) needs outputs with two 96x96 blocks or more after '
                     r'crop_border 0; .*lr/000.png gives 32x32 \(datasets.val in x.yml\)$',
                     error(lambda o: o['val']['metrics'].update(niqe=dict(type='calculate_niqe', crop_border=0))))
    single = lambda o: o['datasets']['test_1'].update(type='SingleImageDataset', dataroot_gt=None)  # noqa: E731
    assert 'val.metrics psnr compare with GT images, but datasets.test_1 (SingleImageDataset) has none' in error(
        single, is_train=False)
    # what is tested: weights of the run's scale, given under the right key
    assert 'path.pretrain_network_g is not set' in error(keep, is_train=False)
    x2 = ESC(**{**{k: v for k, v in TINY_ESC.items() if k != 'type'}, 'upscaling_factor': 2})
    torch.save({'params': x2.state_dict()}, tmp_path / 'x2.pth')
    assert 'x2.pth (path.pretrain_network_g in x.yml) is an x2 checkpoint but network_g is x4' in error(
        lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'x2.pth')), is_train=False)
    from esc_arch import ESCFP  # another arch at another scale: the arch is the problem, not only the scale
    fp_x2 = ESCFP(**{**{k: v for k, v in TINY_ESC.items() if k != 'type'}, 'upscaling_factor': 2})
    torch.save({'params': fp_x2.state_dict()}, tmp_path / 'fp_x2.pth')
    err = error(lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'fp_x2.pth')), is_train=False)
    assert 'fp_x2.pth (path.pretrain_network_g in x.yml) does not fit network_g (ESC): it is an ESCFP x2 checkpoint;' \
        in err and 'to_img' not in err
    fp_opt = lambda o: (o.update(network_g={**TINY_ESC, 'type': 'ESCFP'}),  # noqa: E731
                        o['path'].update(pretrain_network_g=str(tmp_path / 'fp_x2.pth')))
    assert 'fp_x2.pth (path.pretrain_network_g in x.yml) is an x2 checkpoint but network_g is x4' in error(
        fp_opt, is_train=False)
    factored = ESC(**{k: v for k, v in TINY_ESC.items() if k != 'type'}, attn_type='FlashBias', flashbias_rank=3)
    torch.save({'params': factored.state_dict()}, tmp_path / 'fb.pth')  # the authors' ESC_FB_* into a table network
    assert 'fb.pth (path.pretrain_network_g in x.yml) does not fit network_g (ESC): it is a FlashBias checkpoint ' \
        '(attn_type: FlashBias, flashbias_rank: 3); 1 missing keys: blocks.0.attn.relative_position_bias' in error(
            lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'fb.pth')), is_train=False)
    three = ESC(**{**{k: v for k, v in TINY_ESC.items() if k != 'type'}, 'upscaling_factor': 2, 'n_blocks': 2})
    torch.save({'params': three.state_dict()}, tmp_path / 'blocks.pth')  # training re-samples to_img, not blocks
    err = error(lambda o: o['path'].update(pretrain_network_g=str(tmp_path / 'blocks.pth')))
    assert 'does not fit network_g (ESC): ' in err and 'unexpected keys: blocks.1.' in err and 'to_img' not in err
    assert 'path.pretrained_network_g is not an option BasicSR reads (did you mean pretrain_network_g?)' in error(
        lambda o: o['path'].update(pretrained_network_g=str(tmp_path / 'x2.pth')), is_train=False)
    # metrics taking tensors, where SRModel's validation gives arrays (a traceback at the first validation)
    assert 'calculate_psnr_pt takes tensors, but ESCSRModel validates on uint8 images (arrays): use calculate_psnr' in \
        error(psnr(type='calculate_psnr_pt'))
    # BasicSR archives experiments/<name> and makes its folders before these fail
    assert 'logger.wandb.project is set but wandb is not installed' in error(
        lambda o: o['logger'].update(wandb=dict(project='mine')))
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object() if name == 'wandb' else real_find_spec(
        name, *a))
    assert 'logger.wandb needs logger.use_tb_logger: true' in error(
        lambda o: o['logger'].update(wandb=dict(project='m')))
    monkeypatch.setattr(importlib.util, 'find_spec', real_find_spec)
    earlier = tmp_path / 'experiments' / 'tiny' / 'models'
    earlier.mkdir(parents=True)
    torch.save({'params': ESC(**{k: v for k, v in TINY_ESC.items() if k != 'type'}).state_dict()}, earlier / 'net.pth')
    assert 'lies in experiments/tiny, which this run archives (renames) before it loads it' in error(
        lambda o: o['path'].update(pretrain_network_g='experiments/tiny/models/net.pth'))


def test_an_lmdb_is_checked_as_basicsr_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from esc_arch.commands._pipeline import OptionError, check_options
    data = make_pairs(tmp_path / 'data')
    lmdbs = make_lmdbs(data)
    opt = train_options(data)
    opt['datasets']['train'].update(io_backend=dict(type='lmdb'), dataroot_gt=str(lmdbs['hr']),
                                    dataroot_lq=str(lmdbs['lr']))

    def check():
        check_options(copy.deepcopy(opt), 'x.yml', True, argparse.Namespace(auto_resume=False, launcher='none',
                                                                            debug=False))

    check()
    lists = {side: (lmdbs[side] / 'meta_info.txt').read_text() for side in lmdbs}
    # BasicSR keys a blank line '\n' (in both lists, the same keys): the LMDB holds no such key, and
    # the first read of it was a TypeError ('NoneType' object is not subscriptable)
    for side, text in lists.items():
        (lmdbs[side] / 'meta_info.txt').write_text(text + '\n')
    with pytest.raises(OptionError, match=r'hr.lmdb/meta_info.txt, line 5: a blank line'):
        check()
    # the database: a key it does not hold (the same TypeError), a missing data.mdb (lmdb.Error
    # when the first image is read) or a truncated one (a bus error: the run killed without a word)
    for (side, text), size in zip(lists.items(), (32, 8)):
        (lmdbs[side] / 'meta_info.txt').write_text(text + f'004.png ({size},{size},3) 1\n')
    with pytest.raises(OptionError, match=r"1 of the 5 key\(s\) meta_info.txt lists are not in the LMDB "
                                          rf"{lmdbs['hr']}, e.g. '004' \(datasets.train in x.yml\)"):
        check()
    for side, text in lists.items():
        (lmdbs[side] / 'meta_info.txt').write_text(text)
    database = lmdbs['lr'] / 'data.mdb'
    whole = database.read_bytes()
    database.unlink()
    with pytest.raises(OptionError, match=rf"{lmdbs['lr']} has no data.mdb"):
        check()
    database.write_bytes(whole[:len(whole) - 4096])
    with pytest.raises(OptionError, match=rf'{database} is truncated \({len(whole) - 4096} of its {len(whole)} bytes'):
        check()
    database.write_bytes(whole[:100])
    with pytest.raises(OptionError, match=rf"cannot open the LMDB {lmdbs['lr']}: .*MDB_INVALID"):
        check()


def real_options(tmp_path: Path, model_file: str, **extra) -> dict:
    """A shipped ESC-Real option file cut to a CPU-sized run on 2 generated GT images listed in a
    meta_info file (RealESRGANDataset on disk), its perceptual loss removed (no VGG download)."""
    gt = tmp_path / 'gt'
    gt.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        base = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        cv2.imwrite(str(gt / f'{index}.png'), cv2.resize(base, (48, 48), interpolation=cv2.INTER_CUBIC))
    (tmp_path / 'meta.txt').write_text('0.png\n1.png\n')
    opt = yaml.safe_load((Path(__file__).parents[1] / 'options' / model_file).read_text())
    train_set = opt['datasets']['train']
    train_set.update(dataroot_gt=str(gt), meta_info=str(tmp_path / 'meta.txt'), io_backend=dict(type='disk'),
                     gt_size=32, batch_size_per_gpu=2, num_worker_per_gpu=0)
    opt['datasets'] = dict(train=train_set)
    opt.update(num_gpu=0, gt_size=32, queue_size=2, **extra)
    opt.pop('val', None)
    opt['network_g'].update(dim=16, n_blocks=1, conv_blocks=1, window_size=8, num_heads=1)
    if 'network_d' in opt:
        opt['network_d']['num_feat'] = 8
    opt['path'] = dict(pretrain_network_g=None, strict_load_g=True, resume_state=None)
    opt['train'].update(total_iter=2, warmup_iter=-1)
    opt['train'].pop('perceptual_opt', None)
    opt['logger'] = dict(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    return opt


@pytest.mark.parametrize('model_file', ['train_ESC_Real_x4_MSE.yml', 'train_ESC_Real_x4_GAN.yml'])
def test_real_esrgan_models_train_on_the_cpu(tmp_path, model_file):
    # BasicSR's RealESRNetModel / RealESRGANModel put their DiffJPEG, USMSharp and pair queue on
    # CUDA; with num_gpu 0 they train on the CPU (2 iterations, the queue of 2 filled and used). The
    # shipped files name the authors' models (RealHATMSEModel, RealHATGANModel), which build AdamW,
    # the authors' optimizer (BasicSR's two: "optimizer AdamW is not supperted yet")
    opt = real_options(tmp_path, model_file)
    assert opt['model_type'] in ('RealHATMSEModel', 'RealHATGANModel')
    for key in ('optim_g', 'optim_d'):
        if key in opt['train']:
            opt['train'][key].update(type='AdamW', betas=[0.9, 0.9], weight_decay=0.5)
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'real.yml', opt), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = newest_log(tmp_path / 'experiments' / opt['name'])
    assert re.search(r'iter:\s+2,', log) and re.search(r'\bl_(g_)?pix: ', log)
    assert (tmp_path / 'experiments' / opt['name'] / 'models' / 'net_g_2.pth').is_file()
    state = torch.load(tmp_path / 'experiments' / opt['name'] / 'training_states' / '2.state', weights_only=False)
    assert len(state['optimizers']) == (2 if 'optim_d' in opt['train'] else 1)
    for saved in state['optimizers']:
        group = saved['param_groups'][0]
        assert group['decoupled_weight_decay'] and group['betas'] == (0.9, 0.9) and group['weight_decay'] == 0.5
    assert 'is not found, use name' not in result.stdout  # BasicSR's line for UNetDiscriminatorSN_basicsr


def test_the_gan_stage_needs_its_discriminator_and_says_what_it_does_not_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = real_options(tmp_path, 'train_ESC_Real_x4_GAN.yml')
    no_d = {k: v for k, v in opt.items() if k != 'network_d'}  # was "optim_d is not used", then KeyError
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'no_d.yml', no_d))
    assert code == 2 and 'RealHATGANModel trains a discriminator: it needs network_d' in err, err
    net_d = {k: v for k, v in opt['network_d'].items() if k != 'type'}
    from basicsr.archs.discriminator_arch import UNetDiscriminatorSN
    torch.save({'params': UNetDiscriminatorSN(**dict(net_d, num_feat=4)).state_dict()}, tmp_path / 'd.pth')
    wrong_d = dict(opt, path=dict(opt['path'], pretrain_network_d=str(tmp_path / 'd.pth')))  # was a traceback
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'wrong_d.yml', wrong_d))
    assert code == 2 and 'd.pth (path.pretrain_network_d in ' in err and 'does not fit network_d' in err, err
    opt['train'].update(amp='bf16', grad_clip=0.5)  # Real-ESRGAN's step has neither: said, not silently dropped
    from esc_arch.commands._pipeline import check_options
    check_options(opt, 'gan.yml', True, argparse.Namespace(auto_resume=False, launcher='none', debug=False))
    err = capsys.readouterr().err
    assert 'warning: train.amp is not an option RealHATGANModel reads' in err
    assert 'warning: train.grad_clip is not an option RealHATGANModel reads' in err


def test_real_esrgan_option_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = real_options(tmp_path, 'train_ESC_Real_x4_MSE.yml')
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'blank.txt').write_text('0.png\n\n1.png\n')  # BasicSR reads the blank line as dataroot_gt
    (tmp_path / 'wrong.txt').write_text('0.png\nnot_there.png\n')
    (tmp_path / 'spaces.txt').write_text('0.png\n  \n1.png\n')  # stripped by BasicSR: dataroot_gt too
    (tmp_path / 'gt' / 'a_folder').mkdir()
    (tmp_path / 'folder.txt').write_text('0.png\na_folder\n')  # a path, but no image
    for meta, problem in ((None, 'needs meta_info'), ('empty.txt', 'empty.txt lists no images'),
                          ('blank.txt', 'blank.txt, line 2: a blank line, which BasicSR reads as an image path'),
                          ('spaces.txt', 'spaces.txt, line 2: a blank line, which BasicSR reads as an image path'),
                          ('wrong.txt', '1 of its 2 image(s) are not in'),
                          ('folder.txt', f'1 of its 2 image(s) are not in {tmp_path / "gt"}, e.g. a_folder')):
        opt['datasets']['train']['meta_info'] = meta and str(tmp_path / meta)
        code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'meta.yml', opt))
        assert code == 2 and problem in err and err.count('\n') == 0, err
    assert not (tmp_path / 'experiments').exists()
    # Real-ESRGAN's own recipe: dataroot_gt holds subfolders only, the list names the images in them
    # (was refused: "no images in")
    (tmp_path / 'gt' / 'sub').mkdir()
    for name in ('0.png', '1.png'):
        (tmp_path / 'gt' / name).rename(tmp_path / 'gt' / 'sub' / name)
    (tmp_path / 'sub.txt').write_text('sub/0.png\nsub/1.png\n')
    opt['datasets']['train']['meta_info'] = str(tmp_path / 'sub.txt')
    from esc_arch.commands._pipeline import check_options
    check_options(opt, 'meta.yml', True, argparse.Namespace(auto_resume=False, launcher='none', debug=False))
    # BasicSR takes each line up to its first space: what follows (e.g. an image's size) is not read
    (tmp_path / 'sized.txt').write_text('sub/0.png (48,48,3)\nsub/1.png 48 48\n')
    opt['datasets']['train']['meta_info'] = str(tmp_path / 'sized.txt')
    check_options(opt, 'meta.yml', True, argparse.Namespace(auto_resume=False, launcher='none', debug=False))


MSE, GAN = 'train_ESC_Real_x4_MSE.yml', 'train_ESC_Real_x4_GAN.yml'


@pytest.mark.parametrize('model_file, change, problem', [
    # each was a traceback at the first iteration (after set-up) or in a loader worker
    (MSE, lambda o: o.update(gt_size=66), 'gt_size 66 is not a multiple of scale 4'),  # a shape RuntimeError
    (MSE, lambda o: o.update(gt_size=512), 'gt_size 512 is larger than the 400x400 GT crop'),  # "Please remove None"
    (MSE, lambda o: o.pop('jpeg_range2'), "degradation needs the option(s) jpeg_range2 ("),  # KeyError
    (MSE, lambda o: o.pop('gt_usm'), 'needs the option(s) gt_usm'),
    (MSE, lambda o: o.update(gt_usm='true'), "gt_usm must be true or false, got 'true' (the top level of "),
    (MSE, lambda o: o.update(gt_usm='true'), "real.yml; BasicSR tests it with \"is True\", so 'true' would be "
                                             'taken as false)'),  # silently off
    (GAN, lambda o: o.update(gan_gt_usm='false'), "BasicSR tests it with \"is False\", so 'false' would be taken "
                                                  'as true'),  # silently on
    (GAN, lambda o: o.pop('percep_gt_usm'), 'needs the option(s) percep_gt_usm'),  # read without a perceptual loss
    (GAN, lambda o: o['train'].pop('optim_d'), 'RealHATGANModel needs train.optim_d'),  # KeyError
    (GAN, lambda o: o['train'].pop('gan_opt'), 'RealHATGANModel needs train.gan_opt'),  # AttributeError cri_gan
    (GAN, lambda o: o['train'].update(net_d_iters=0), 'train.net_d_iters must be a whole number >= 1'),  # 1/0
    (GAN, lambda o: o['network_d'].update(num_in_ch=1), 'network_d.num_in_ch is 1, but ESCReal outputs 3'),
    (GAN, lambda o: o['train'].update(ldl_opt=dict(type='L1Loss', loss_weight=1.0), ema_decay=0),
     "ldl_opt compares the output with the EMA network's: it needs train.ema_decay above 0"),  # no net_g_ema
    (MSE, lambda o: o.update(resize_prob=[0.5, 0.5]), 'resize_prob must be a list of 3 weights'),
    (MSE, lambda o: o.update(jpeg_range=50), 'jpeg_range must be a [low, high] list of two numbers, got 50'),
    (MSE, lambda o: o.update(jpeg_range=[95, 30]), 'jpeg_range must have low <= high'),
    (MSE, lambda o: o.update(noise_range2=[-1, 25]), 'noise_range2 must be at least 0'),
    (MSE, lambda o: o.update(resize_range=[0, 1.5]), 'resize_range must be above 0'),  # a 0-pixel resize
    (MSE, lambda o: o.update(jpeg_range2=[30, 101]), 'jpeg_range2 must be at most 100'),
    # quality 100 made DiffJPEG divide by 0: a nan LQ image, then "invalid Poisson rate" (or a nan loss)
    (MSE, lambda o: o.update(jpeg_range=[100, 100]), 'jpeg_range must have low below 100, got [100, 100]'),
    (MSE, lambda o: o.update(gaussian_noise_prob=1.5), 'gaussian_noise_prob must be a probability from 0 to 1'),
    (MSE, lambda o: o.update(queue_size=0), 'queue_size must be a whole number >= 1, got 0'),
    (MSE, lambda o: o.update(queue_size=3), 'queue_size (3) must be a multiple of the batch size per process (2)'),
    (MSE, lambda o: o.update(scale=3, gt_size=96, network_g=dict(type='ESC', **tiny_config(upscaling_factor=3))),
     'scale 3 does not divide 400'),  # "Scale mismatches" in the first iteration
    (MSE, lambda o: o.update(high_order_degradation=False), 'RealESRGANDataset gives GT images only'),  # KeyError lq
    # a quoted 'false' is a string, which BasicSR takes as true: it degraded anyway
    (MSE, lambda o: o.update(high_order_degradation='false'),
     "high_order_degradation must be true or false, got 'false'"),
    # a data set of GT images alone to validate on, or to train a model that degrades nothing: a KeyError
    # at the first validation (after training) or iteration
    (MSE, lambda o: o['datasets'].update(val=dict(o['datasets']['train'], name='rv')) or o.update(val=dict(val_freq=2)),
     'RealESRGANDataset gives GT images only, but RealHATMSEModel validates on LQ images'),
    (MSE, lambda o: o.update(model_type='ESCSRModel'), 'RealESRGANDataset gives GT images only, but ESCSRModel trains '
                                                       'on LQ images'),
    (MSE, lambda o: o['datasets']['train'].update(kernel_prob=[0.5] * 5), 'kernel_prob must be a list of 6 weights'),
    (MSE, lambda o: o['datasets']['train']['kernel_list'].__setitem__(0, 'isoo'), "unknown kernel 'isoo' (did you "
                                                                                   'mean iso?)'),  # UnboundLocalError
    (MSE, lambda o: o['datasets']['train'].update(blur_sigma=[0.2]), 'blur_sigma must be a [low, high] list'),
    (MSE, lambda o: o['datasets']['train'].update(blur_sigma2=[0.2, 0.2]), 'blur_sigma2 must have low < high'),
    (MSE, lambda o: o['datasets']['train'].update(sinc_prob2=2), 'sinc_prob2 must be a probability'),
    (MSE, lambda o: o['datasets']['train'].pop('betag_range'), 'RealESRGANDataset needs the option(s) betag_range'),
    # a missing key is not hinted as another key the model also reads (jpeg_range is given as itself)
    (MSE, lambda o: o.pop('jpeg_range2'), "degradation needs the option(s) jpeg_range2 (the top level of "),
    # a key given in another case is found (BasicSR's keys are case-sensitive: a KeyError)
    (MSE, lambda o: o['datasets']['train'].update(BETAG_RANGE=o['datasets']['train'].pop('betag_range')),
     'RealESRGANDataset needs the option(s) betag_range (did you mean BETAG_RANGE?)'),
    (MSE, lambda o: o['datasets']['train'].update(io_backend='disk'),  # BasicSR: "string indices must be integers"
     "io_backend must be a mapping such as {type: disk}, got 'disk' (datasets.train in "),
    (MSE, lambda o: o['datasets']['train'].update(meta_info=[o['datasets']['train']['meta_info']]),  # open(list)
     'RealESRGANDataset on disk needs meta_info: a text file listing its GT images'),
    (MSE, lambda o: o.update(queue_size=4) or o['datasets']['train'].update(batch_size_per_gpu=4),
     '2 training image(s) x dataset_enlarge_ratio make 2 sample(s), fewer than batch_size_per_gpu 4'),  # trained 0
])
def test_real_degradation_option_mistakes_are_one_line(model_file, change, problem, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = real_options(tmp_path, model_file)
    change(opt)
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'real.yml', opt))
    assert code == 2 and problem in err and err.count('\n') == 0, err
    assert not (tmp_path / 'experiments').exists()


def test_a_real_model_on_a_paired_set_or_an_lmdb_is_checked_as_basicsr_reads_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = real_options(tmp_path, MSE)
    lq = tmp_path / 'lq'
    lq.mkdir()
    for index in range(2):
        cv2.imwrite(str(lq / f'{index}.png'), np.full((12, 12, 3), 9 * index, np.uint8))
    train_set = opt['datasets']['train']
    paired = dict(type='PairedImageDataset', dataroot_gt=train_set['dataroot_gt'], dataroot_lq=str(lq),
                  io_backend=dict(type='disk'), gt_size=32, use_hflip=True, use_rot=False, batch_size_per_gpu=2,
                  num_worker_per_gpu=0)

    def error(options) -> str:
        code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'real.yml', options))
        assert code == 2 and err.count('\n') == 0, err
        return err

    # the high-order degradation (the default) reads the kernels only RealESRGANDataset gives: a
    # paired set was a KeyError 'kernel1' at the first iteration, and with the degradation keys
    # left out (as a paired recipe does) the missing keys were named, not the real mistake
    # BasicSR's build_dataset logs every data set by its name: a KeyError once the run was set up
    assert 'PairedImageDataset needs the option(s) name (datasets.train in ' in error(
        dict(opt, datasets=dict(train=paired), high_order_degradation=False))
    paired['name'] = 'pairs'
    sharp = dict(opt, datasets=dict(train=paired))
    assert 'datasets.train is PairedImageDataset: use RealESRGANDataset, or set high_order_degradation: false' \
        in error(sharp)
    assert 'or set high_order_degradation: false' in error({k: v for k, v in sharp.items() if k != 'jpeg_range2'})
    from esc_arch.commands._pipeline import check_options
    namespace = argparse.Namespace(auto_resume=False, launcher='none', debug=False)
    check_options(dict(copy.deepcopy(sharp), high_order_degradation=False), 'real.yml', True, namespace)
    # RealESRGANPairedDataset without a meta_info pairs its folders by name, as PairedImageDataset does
    check_options(dict(copy.deepcopy(sharp), high_order_degradation=False,
                       datasets=dict(train=dict(paired, type='RealESRGANPairedDataset'))), 'real.yml', True, namespace)
    # one training set: BasicSR refuses train_2 ("Dataset phase train_2 is not recognized") after set-up
    assert "data set 'train_2': BasicSR trains on one data set, datasets.train" in error(
        dict(opt, datasets=dict(train=train_set, train_2=copy.deepcopy(train_set))))
    # an LMDB of GT images: RealESRGANDataset takes each meta_info.txt line's name up to its first
    # dot as a key (no sizes needed), every line counted
    gt_lmdb = tmp_path / 'gt.lmdb'
    gt_lmdb.mkdir()
    lmdb_set = dict(train_set, io_backend=dict(type='lmdb'), dataroot_gt=str(gt_lmdb), batch_size_per_gpu=2)
    lmdb_opt = dict(opt, datasets=dict(train=lmdb_set))
    assert f'{gt_lmdb} has no meta_info.txt' in error(lmdb_opt)
    for text, problem in (('0.png\n\n1.png\n', 'the LMDB list ' + f'{gt_lmdb / "meta_info.txt"}, line 2: a blank line'),
                          ('', 'meta_info.txt lists no images'),
                          ('0\n1.png\n', 'line 1: expected "name.png ...", got \'0\''),
                          ('0.png\n.png\n', 'line 2: expected "name.png ...", got \'.png\''),  # key ''
                          ('0.png\n', 'make 1 sample(s), fewer than batch_size_per_gpu 2')):
        write_lmdb(gt_lmdb, text)
        assert problem in error(lmdb_opt)
    write_lmdb(gt_lmdb, '0.png\n0.png\n')  # a repeated key is read twice: 2 samples
    check_options(copy.deepcopy(lmdb_opt), 'real.yml', True, namespace)
    # RealESRGANPairedDataset's own list: "gt, lq" lines, which may name images in subfolders
    for side in ('gt', 'lq'):
        (tmp_path / f'{side}_tree' / 'sub').mkdir(parents=True)
    for index in range(2):
        for side, folder in (('gt', train_set['dataroot_gt']), ('lq', lq)):
            (Path(folder) / f'{index}.png').rename(tmp_path / f'{side}_tree' / 'sub' / f'{index}.png')
    listed = dict(paired, type='RealESRGANPairedDataset', dataroot_gt=str(tmp_path / 'gt_tree'),
                  dataroot_lq=str(tmp_path / 'lq_tree'), meta_info=str(tmp_path / 'pairs.txt'))
    listed_opt = dict(opt, datasets=dict(train=listed), high_order_degradation=False)
    for text, problem in (('sub/0.png, sub/0.png\nsub/1.png\n', 'line 2: expected "gt_path, lq_path"'),
                          ('sub/0.png, sub/0.png\nsub/1.png, sub/2.png\n', '1 of its 2 image(s) are not in '
                           f'{tmp_path / "lq_tree"}, e.g. sub/2.png'),
                          ('sub/0.png, sub/0.png\n', 'make 1 sample(s), fewer than batch_size_per_gpu 2'),
                          # BasicSR unpacks line.strip().split(', ') into two paths: a ValueError otherwise
                          ('sub/0.png,sub/0.png\nsub/1.png, sub/1.png\n', 'line 1: expected "gt_path, lq_path"'),
                          ('sub/0.png, sub/0.png\nsub/1.png, sub/1.png, sub/0.png\n',
                           'line 2: expected "gt_path, lq_path"')):
        (tmp_path / 'pairs.txt').write_text(text)
        assert problem in error(listed_opt)
    assert 'meta_info must be the path of a text file of "gt, lq" lines, got 3 (' in error(
        dict(listed_opt, datasets=dict(train=dict(listed, meta_info=3))))
    (tmp_path / 'pairs.txt').write_text('sub/0.png, sub/0.png  \nsub/1.png, sub/1.png\n')  # stripped, as BasicSR does
    check_options(copy.deepcopy(listed_opt), 'real.yml', True, namespace)
    assert not (tmp_path / 'experiments').exists()


def test_the_shipped_real_options_pass_the_degradation_checks(tmp_path):
    from esc_arch.commands import _real_checks
    for model_file in (MSE, GAN):
        (tmp_path / model_file).mkdir()
        opt = real_options(tmp_path / model_file, model_file)
        _real_checks.check_real_model_options(opt, model_file)
        _real_checks.check_real_dataset_options(opt['datasets']['train'], model_file)
        # edge values BasicSR takes: no noise, probabilities 0 and 1, one sure resize direction, qualities
        # drawn up to 100 (from [low, high): 100 itself never)
        opt.update(noise_range=[0, 0], poisson_scale_range2=[0, 3], gray_noise_prob=0, second_blur_prob=1,
                   resize_prob=[0, 0, 1], jpeg_range=[30, 100], jpeg_range2=[95, 95])
        _real_checks.check_real_model_options(opt, model_file)
        _real_checks.check_real_dataset_options(dict(opt['datasets']['train'], blur_sigma=[0, 3]), model_file)
    assert _real_checks.real_model_kind('RealESRGANModel') == 'esrgan'
    assert _real_checks.real_model_kind('RealHATMSEModel') == 'esrnet'
    assert _real_checks.real_model_kind('ESCSRModel') is None and _real_checks.real_model_kind('nope') is None


def test_the_gan_stage_stops_on_nan_and_resumes_only_with_its_discriminator(tmp_path, capsys):
    # Real-ESRGAN's step had no NaN check: lr 1e8 trained on in nan and saved nan weights for
    # --auto_resume to pick up. And resuming checked net_g only: a truncated net_d file was a
    # traceback (no fall-back), a changed network_d or optim_d one from deep in torch
    opt = real_options(tmp_path, GAN, name='gan')
    opt['train'].update(total_iter=4)
    opt['logger']['save_checkpoint_freq'] = 2
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'gan.yml', opt), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / 'experiments' / 'gan'
    diverging = copy.deepcopy(opt)
    diverging.update(name='diverge')
    for key in ('optim_g', 'optim_d'):
        diverging['train'][key]['lr'] = 1e8
    result = basicsr('train', '-opt', write_yaml(tmp_path / 'diverge.yml', diverging), cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    match = re.search(r'loss is nan at iteration (\d+); stopping \(last good state: ([^)]+)\)', output)
    assert result.returncode == 1 and match and 'Traceback' not in output, output[-3000:]
    models = tmp_path / 'experiments' / 'diverge' / 'models'
    assert not (models / f'net_g_{match.group(1)}.pth').exists() and not (models / 'net_g_latest.pth').exists()
    for saved in models.glob('net_*.pth'):  # what was saved before it diverged is finite
        assert all(torch.isfinite(v).all() for v in torch.load(saved, weights_only=True)['params'].values())

    from esc_arch.commands._pipeline import OptionError, load_resume_state

    def resume(**train_changes):
        resumed = copy.deepcopy(opt)
        resumed.update(auto_resume=True, is_train=True, dist=False)
        resumed['path'].update(models=str(experiment / 'models'), training_states=str(experiment / 'training_states'))
        for key, value in train_changes.items():
            (resumed if key == 'network_d' else resumed['train'])[key] = value
        return load_resume_state(resumed)

    assert resume()['iter'] == 4
    capsys.readouterr()
    # a killed save's half-written file: SRGANModel's set-up does not call ESCSRModel's, which removes them
    stale = experiment / 'models' / '.net_g_6.abcd1234.tmp.pth'
    stale.write_bytes(b'half a checkpoint')
    result = basicsr('train', '-opt', tmp_path / 'gan.yml', '--auto_resume', cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and 'Resuming training from epoch' in result.stdout + result.stderr, \
        result.stderr[-3000:]
    assert not stale.exists()
    with pytest.raises(OptionError, match=r'resume state .*4\.state \(its network .*net_d_4\.pth\) does not fit '
                                          r'network_d \(UNetDiscriminatorSN\)'):
        resume(network_d=dict(opt['network_d'], num_feat=16))
    with pytest.raises(OptionError, match=r'cannot resume from .*4\.state: it was saved with another optimizer than '
                                          r'train\.optim_d SGD'):
        resume(optim_d=dict(type='SGD', lr=1e-4, momentum=0.9))
    net_d = experiment / 'models' / 'net_d_4.pth'
    net_d.write_bytes(net_d.read_bytes()[:1000])  # a kill while it was written by a tool without atomic saves
    assert resume()['iter'] == 2
    said = capsys.readouterr().out
    assert re.search(r'Cannot resume from \S+4\.state \(.*net_d_4\.pth.*\); trying \S+2\.state', said), said


def test_the_gan_stage_records_no_graph_of_its_ema_network(tmp_path):
    # the GAN stage's set-up (SRGANModel's) left the EMA network's parameters trainable: its forward
    # for ldl_opt recorded an autograd graph, and output_ema kept its activations to the next iteration
    from esc_arch.commands._pipeline import patch_basicsr
    from esc_arch.models.real_models import ESCRealESRGANModel
    patch_basicsr(use_cuda=False)  # BasicSR's Real-ESRGAN puts its DiffJPEG on CUDA
    opt = real_options(tmp_path, GAN)
    opt['train']['ldl_opt'] = dict(type='L1Loss', loss_weight=1.0)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, auto_resume=False)
    opt['path'].update(models=str(tmp_path), training_states=str(tmp_path))
    model = ESCRealESRGANModel(opt)
    model.lq, model.gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    model.gt_usm = model.gt
    model.optimize_parameters(1)
    assert 'l_g_ldl' in model.log_dict and not model.output_ema.requires_grad
    assert not any(param.requires_grad for param in model.net_g_ema.parameters())


def test_an_offline_perceptual_loss_says_which_weights_to_put_where(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.models._api
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network here')
    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', offline)
    opt = train_options(make_pairs(tmp_path / 'data'))
    opt['train']['perceptual_opt'] = dict(type='PerceptualLoss', layer_weights={'conv5_4': 1}, vgg_type='vgg19',
                                          perceptual_weight=1.0, style_weight=0, criterion='l1')
    code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'percep.yml', opt))
    err = err.splitlines()[-1]  # after BasicSR's start-up log: the model is built once it has run
    assert code == 2 and err.startswith('basicsr train: error: the perceptual loss needs'), err
    assert 'vgg19-dcbb9e9d.pth' in err and str(tmp_path / 'torch_home' / 'hub' / 'checkpoints') in err
    assert 'no network here' in err


def test_loader_and_frequency_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_pairs(tmp_path / 'data')
    for change, problem in (
            (lambda o: o['val'].update(val_freq=0), 'val.val_freq must be a whole number of iterations >= 1, got 0'),
            (lambda o: o['val'].update(val_freq=-5), 'val.val_freq must be'),
            (lambda o: o['logger'].update(print_freq=0), 'logger.print_freq must be'),
            (lambda o: o['logger'].pop('save_checkpoint_freq'), 'logger.save_checkpoint_freq must be a whole number'),
            (lambda o: o['datasets']['train'].update(num_worker_per_gpu=-1), 'num_worker_per_gpu must be a whole'),
            (lambda o: o['datasets']['train'].update(prefetch_mode='gpu'), "prefetch_mode must be cpu, cuda or empty")):
        opt = train_options(data)
        change(opt)
        code, err = run_cli(capsys, 'train', '-opt', write_yaml(tmp_path / 'freq.yml', opt))
        assert code == 2 and problem in err and err.count('\n') == 0, err
    assert not (tmp_path / 'experiments').exists()


def test_too_few_samples_per_ddp_process_for_a_batch_is_one_line(tmp_path):
    from esc_arch.commands import _pipeline
    data = make_pairs(tmp_path / 'data')  # 4 pairs
    opt = train_options(data)
    opt['datasets']['train']['batch_size_per_gpu'] = 3
    _pipeline._data_checks.check_images(opt, 'train', opt['datasets']['train'], 'x.yml')  # one process: 4 >= 3
    with pytest.raises(_pipeline.OptionError, match=r'make 2 sample\(s\) per process \(2 processes\), fewer than '
                       r'batch_size_per_gpu 3'):  # 2 processes: ceil(4 / 2) = 2 each, and no full batch
        _pipeline._data_checks.check_images(opt, 'train', opt['datasets']['train'], 'x.yml', world=2)


def test_ema_of_a_network_deployed_by_validation(tmp_path):
    # deployment: true deploys the EMA network at its first validation forward; the next EMA
    # update must reach its trained weights, and its output then be the undeployed EMA's
    model = ESCSRModel(model_options(tmp_path, network=dict(TINY_ESC, kernel_size=13, deployment=True)))
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        before = {k: v.clone() for k, v in model.net_g_ema.state_dict().items()}
        model.net_g_ema.eval()(x)
        assert model.net_g_ema.deployed
        for param in model.net_g.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # a few training steps
        model.model_ema(decay=0.9)  # not 0.5, where the two weights of the mean are alike
        assert not model.net_g_ema.deployed
        online = model.net_g.state_dict()
        expected = ESC(**{k: v for k, v in TINY_ESC.items() if k != 'type'} | dict(kernel_size=13)).eval()
        expected.load_state_dict({k: 0.9 * v + 0.1 * online[k] for k, v in before.items()})
        assert (model.net_g_ema.eval()(x) - expected(x)).abs().max().item() < 1e-5


def test_repeated_force_yml_flags_add_up():
    # `--force_yml a=1 --force_yml b=2` kept only b=2 (argparse's store), silently
    import argparse

    from esc_arch.commands import train
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(['-opt', 'x.yml', '--force_yml', 'use_amp=true', 'name=a',
                              '--force_yml', 'train:total_iter=2'])
    assert args.force_yml == ['use_amp=true', 'name=a', 'train:total_iter=2']
    assert parser.parse_args(['-opt', 'x.yml']).force_yml is None


def test_force_yml_manual_seed_seeds_the_run_and_signed_numbers_stay_ints():
    # BasicSR seeds before it applies --force_yml, so manual_seed=5 there was saved but not used
    import random

    from basicsr.utils import set_random_seed

    from esc_arch.commands._pipeline import _parse_options_wrapper

    def basicsr_parse(root_path, is_train=True):
        set_random_seed(0)  # what BasicSR does with the file's seed, before the override
        opt = dict(manual_seed=5, rank=0, dist=False, num_gpu=0, datasets={})
        return opt, argparse.Namespace(force_yml=['manual_seed=5'], launcher='none')

    _parse_options_wrapper(basicsr_parse)('.', is_train=True)
    drawn = (torch.rand(3), np.random.rand(), random.random())
    set_random_seed(5)
    expected = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]
    # a signed whole number (normalized to !!float, which BasicSR applied as -1.0) is put back as an int
    forced, _ = _parse_options_wrapper(lambda *a, **k: (dict(manual_seed=0, dist=False, num_gpu=0, datasets={},
                                                           logger=dict(print_freq=-1.0)),
                                                      argparse.Namespace(force_yml=['logger:print_freq=!!float -1'],
                                                                         launcher='none')))('.')
    assert forced['logger']['print_freq'] == -1 and isinstance(forced['logger']['print_freq'], int)


def test_newest_state_is_found_whatever_order_the_folder_lists(tmp_path, monkeypatch):
    from esc_arch.models.esr_model import latest_training_state
    for it in (5000, 10000, 15000, 20000, 25000, 30000):
        (tmp_path / f'{it}.state').write_bytes(b'')
    listed = ['10000.state', '30000.state', '20000.state', 'x.state', '25000.state', '15000.state', '5000.state']
    monkeypatch.setattr(os, 'listdir', lambda folder: list(listed))  # what a file system may return
    assert saved_iterations(str(tmp_path)) == [5000, 10000, 15000, 20000, 25000, 30000]
    assert latest_training_state(str(tmp_path)) == str(tmp_path / '30000.state')


def test_no_state_points_at_a_network_that_was_not_saved(tmp_path):
    model = ESCSRModel(model_options(tmp_path))
    model.save_network = lambda *args, **kwargs: False  # given up after its retries (a full disk)
    model.save(0, 2)
    assert not list(tmp_path.glob('*.state'))
    del model.save_network
    model.save(0, 2)
    assert (tmp_path / '2.state').is_file() and (tmp_path / 'net_g_2.pth').is_file()
    # a GAN's (ESCRealESRGANModel saves as ESCSRModel): its discriminator too; SRGANModel's went on regardless
    model.net_d = torch.nn.Conv2d(3, 1, 3)
    real_save = model.save_network
    model.save_network = lambda net, label, *args, **kwargs: False if label == 'net_d' else real_save(
        net, label, *args, **kwargs)
    model.save(0, 4)
    assert (tmp_path / 'net_g_4.pth').is_file() and not (tmp_path / '4.state').exists()
    del model.save_network
    model.save(0, 4)
    assert (tmp_path / 'net_d_4.pth').is_file() and (tmp_path / '4.state').is_file()
    from esc_arch.models.real_models import ESCRealESRGANModel
    assert ESCRealESRGANModel.save is ESCSRModel.save


def test_the_last_log_line_eta_is_zero_not_minus_one_day():
    import datetime

    from esc_arch.commands._pipeline import patch_basicsr
    patch_basicsr(use_cuda=False)
    import basicsr.train
    logger = basicsr.train.MessageLogger(dict(name='t', logger=dict(print_freq=1, use_tb_logger=False),
                                              train=dict(total_iter=5)), start_iter=0)
    logger.start_time = time.time() - 10  # 10 s for the 5 iterations
    lines = []
    logger.logger = type('L', (), {'info': lambda self, line: lines.append(line)})()
    logger(dict(epoch=0, iter=5, lrs=[1e-4], time=2.0, data_time=0.1))
    eta = re.search(r'eta: ([^,]+),', lines[-1]).group(1)
    assert eta == str(datetime.timedelta(seconds=0)), lines[-1]



def test_data_sets_reading_one_lmdb_share_it(tmp_path):
    """LMDB opens a database once per process: a second data set on it (validating on the training
    LMDB, two test sets) failed with 'already open in this process', and so did a loader worker
    forked after the main process had read it (the next epoch's workers, after a validation)."""
    from basicsr.data.paired_image_dataset import PairedImageDataset

    from esc_arch.commands._pipeline import patch_basicsr
    patch_basicsr(use_cuda=False)
    data = make_pairs(tmp_path / 'data')
    lmdbs = make_lmdbs(data)

    def dataset():  # each its own options, as BasicSR's (the data set pops its io_backend's type)
        return PairedImageDataset(dict(phase='val', scale=SCALE, dataroot_gt=str(lmdbs['hr']),
                                       dataroot_lq=str(lmdbs['lr']), io_backend=dict(type='lmdb')))
    first, second = dataset(), dataset()
    expected = cv2.imread(str(data / 'hr' / '001.png'))[:, :, ::-1] / 255
    for each in (first, second):
        np.testing.assert_allclose(each[1]['gt'].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    loader = torch.utils.data.DataLoader(dataset(), num_workers=1, multiprocessing_context='fork')
    assert torch.equal(next(iter(loader))['lq'][0], first[0]['lq'])
    # the checks before a run read the same environment: a second run in this process (basicsr train
    # then test, from Python) was 'cannot open the LMDB ...: ... already open in this process'
    from esc_arch.commands import _data_checks
    _data_checks._check_lmdb_database(str(lmdbs['hr']), ['000', '003'], 'x.yml')
    # an LMDB made again at the same path is read anew, not through the old environment
    cv2.imwrite(str(data / 'hr' / '001.png'), np.zeros((32, 32, 3), np.uint8))
    for folder in lmdbs.values():
        shutil.rmtree(folder)
    make_lmdbs(data)
    assert dataset()[1]['gt'].abs().max() == 0


@pytest.mark.parametrize('kind', ['bare', 'safetensors'])
def test_basicsrs_own_models_load_the_network_files_the_checks_accept(tmp_path, kind):
    """The option checks read a pretrained network as ESCSRModel loads it; BasicSR's own SRModel
    failed on a bare state dict (KeyError: 'params') and on a .safetensors file after they passed."""
    from basicsr.models.sr_model import SRModel
    from safetensors.torch import save_file

    from esc_arch.commands._pipeline import patch_basicsr
    patch_basicsr(use_cuda=False)
    source = randomize_(ESC(**{k: v for k, v in TINY_ESC.items() if k != 'type'}))
    path = tmp_path / ('net.pth' if kind == 'bare' else 'net.safetensors')
    if kind == 'bare':
        torch.save(source.state_dict(), path)
    else:
        save_file(source.state_dict(), str(path))
    opt = model_options(tmp_path, is_train=False)
    opt.update(model_type='SRModel')
    opt['path'].update(pretrain_network_g=str(path), param_key_g='params_ema', strict_load_g=True)
    model = SRModel(opt)
    torch.testing.assert_close(model.net_g.state_dict(), source.state_dict(), rtol=0, atol=0)


def test_a_final_network_that_cannot_be_saved_fails_the_run(tmp_path, caplog, monkeypatch):
    """The end-of-run save of net_g_latest.pth gave up (a full disk) with a log line and exit 0: a
    scheduler saw success, with the run's result missing."""
    import esc_arch.models.esr_model as esr_model
    monkeypatch.chdir(tmp_path)
    opt = train_options(make_pairs(tmp_path / 'data'), name='final', total_iter=2)
    opt.pop('val')
    opt['datasets'].pop('val')
    real_save = esr_model.atomic_torch_save

    def full_disk_at_the_end(obj, path):
        if path.endswith('_latest.pth'):
            raise OSError(28, 'No space left on device')
        return real_save(obj, path)
    monkeypatch.setattr(esr_model, 'atomic_torch_save', full_disk_at_the_end)
    monkeypatch.setattr(esr_model.time, 'sleep', lambda seconds: None)
    code = cli_main(['train', '-opt', str(write_yaml(tmp_path / 'final.yml', opt))])
    said = [record.getMessage() for record in caplog.records if record.levelname == 'ERROR']
    assert code == 1, said
    assert said[-1].startswith('training ran to the end, but its final network could not be saved in '), said
    assert said[-1].endswith('the latest checkpoint is that of iteration 2'), said
    assert (tmp_path / 'experiments' / 'final' / 'models' / 'net_g_2.pth').is_file()
