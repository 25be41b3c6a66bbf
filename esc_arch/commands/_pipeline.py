"""What ``basicsr train`` and ``basicsr test`` share.

Both run BasicSR's own ``train_pipeline`` / ``test_pipeline`` with the flags of BasicSR's
scripts. Before that, the option file is read and checked here, so a mistake (a YAML that does
not parse, an unknown arch or model, a missing data set) is one line naming the file, not a
traceback. A few BasicSR functions are replaced, never edited, for CPU and CPU-DDP runs:

* ``dist_util._init_dist_pytorch`` / ``_init_dist_slurm``: gloo and no ``torch.cuda.set_device``
  when the run is on CPU; the device of a CUDA run is chosen by ``LOCAL_RANK``.
* ``train.load_resume_state``: maps a state to the run's device (BasicSR always maps to CUDA)
  and, with ``--auto_resume``, falls back to an older state if the newest cannot be read.
* ``train/test.parse_options``: on CPU, ``prefetch_mode: cuda`` becomes the plain loader.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections import OrderedDict
from os import path as osp

import torch
import yaml

from ..models.esr_model import TrainingDivergedError, latest_training_state, resolve_amp, saved_iterations
from ..plugins import PluginImportError, add_import_argument, import_arch_modules

DATA_PATH_KEYS = ('dataroot_gt', 'dataroot_lq', 'dataroot', 'meta_info_file', 'meta_info')


class OptionError(Exception):
    """An option file or flag the pipeline cannot run; the message is one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of BasicSR's ``train.py`` / ``test.py`` (``basicsr.utils.options.parse_options``)."""
    parser.add_argument('-opt', required=True, metavar='FILE.yml', help='path to the option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: pytorch under torchrun (gloo on CPU, nccl on CUDA), or slurm')
    parser.add_argument('--auto_resume', action='store_true',
                        help='continue from the newest state in experiments/<name>/training_states')
    parser.add_argument('--debug', action='store_true', help='debug run: name prefixed debug_, frequent logs')
    parser.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=0,
                        help='set by torch.distributed.launch; torchrun uses LOCAL_RANK instead')
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEY=VALUE',
                        help='override options, e.g. train:ema_decay=0.999 num_gpu=0')
    add_import_argument(parser, 'network_g can name')


# ------------------------------------------------------------------------------ options
def normalize_force_yml(entries):
    """``key=1e-4`` as ``key=!!float 1e-4``: BasicSR's parser would keep such a number a string."""
    normalized = []
    for entry in entries or ():
        key, sep, value = entry.partition('=')
        try:
            float(value)
        except ValueError:
            pass
        else:
            if not value.strip().replace('.', '', 1).isdigit():
                value = f'!!float {value.strip()}'
        normalized.append(key + sep + value)
    return normalized


def load_options(opt_path: str, force_yml=None) -> dict:
    """Parse the option file as BasicSR does and apply ``--force_yml``; OptionError if it fails."""
    from basicsr.utils.options import _postprocess_yml_value, ordered_yaml

    if not osp.isfile(opt_path):
        raise OptionError(f'option file not found: {opt_path}')
    try:
        with open(opt_path) as file:
            opt = yaml.load(file, Loader=ordered_yaml()[0])
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(exc, 'problem', None) or str(exc).splitlines()[0]
        raise OptionError(f'cannot parse {opt_path}: {problem}{where}') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f'cannot read {opt_path}: {exc}') from None
    if not isinstance(opt, dict):
        raise OptionError(f'{opt_path} must hold a mapping of options (name, model_type, network_g, ...), '
                          f'got {type(opt).__name__}')
    for entry in normalize_force_yml(force_yml):
        if entry.count('=') != 1:
            raise OptionError(f'--force_yml {entry!r}: expected KEY=VALUE, with KEY like train:ema_decay')
        keys, value = (part.strip() for part in entry.split('='))
        *parents, last = keys.split(':')
        node = opt
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise OptionError(f'--force_yml {entry!r}: {opt_path} has no section {key!r} on that path')
            node = node[key]
        node[last] = _postprocess_yml_value(value)
    return opt


def resolve_num_gpu(opt: dict) -> int:
    num_gpu = opt['num_gpu']
    return torch.cuda.device_count() if num_gpu == 'auto' else int(num_gpu)


def _registered(registry) -> str:
    return ', '.join(sorted(registry.keys()))


def _check_arch_arguments(arch, net_opt: dict, where: str) -> None:
    """The YAML keys of an arch are its constructor's arguments: name unknown and missing ones."""
    try:
        params = inspect.signature(arch).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    given = set(net_opt) - {'type'}
    unknown = sorted(given - set(params))
    missing = [name for name, p in params.items()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in given]
    if unknown or missing:
        problem = '; '.join(filter(None, [unknown and f'unknown option(s) {", ".join(unknown)}',
                                          missing and f'missing option(s) {", ".join(missing)}']))
        raise OptionError(f'{arch.__name__}: {problem} ({where}); it takes: {", ".join(params)}')


def check_options(opt: dict, opt_path: str, is_train: bool, args) -> None:
    """Everything BasicSR would only find out with a traceback (or after minutes of start-up)."""
    import basicsr.archs  # noqa: F401  (fill the registries)
    import basicsr.data  # noqa: F401
    import basicsr.models  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    required = ['name', 'model_type', 'num_gpu', 'datasets', 'network_g', 'path'] + (['train', 'logger'] * is_train)
    missing = [key for key in required if key not in opt]
    if missing:
        raise OptionError(f'{opt_path} lacks the option(s) {", ".join(missing)}')
    if opt['model_type'] not in MODEL_REGISTRY:
        raise OptionError(f'unknown model_type {opt["model_type"]!r} in {opt_path}; registered models: '
                          f'{_registered(MODEL_REGISTRY)}')
    for key, net_opt in opt.items():
        if key.startswith('network_'):
            net_type = net_opt.get('type') if isinstance(net_opt, dict) else None
            if net_type not in ARCH_REGISTRY:
                raise OptionError(f'unknown arch {net_type!r} ({key}.type in {opt_path}); registered archs: '
                                  f'{_registered(ARCH_REGISTRY)}')
            _check_arch_arguments(ARCH_REGISTRY.get(net_type), net_opt, f'{key} in {opt_path}')

    datasets = opt['datasets']
    if not isinstance(datasets, dict) or not datasets:
        raise OptionError(f'{opt_path}: datasets must name at least one data set')
    if is_train and 'train' not in datasets:
        raise OptionError(f'{opt_path}: datasets has no train entry (found {", ".join(datasets)})')
    phases = ('train', 'val') if is_train else ('test', 'val')
    for phase, dataset in datasets.items():
        if phase.split('_')[0] not in phases:
            raise OptionError(f'{opt_path}: data set {phase!r} must be named {" or ".join(phases)} (or *_N)')
        if not isinstance(dataset, dict):
            raise OptionError(f'{opt_path}: datasets.{phase} must be a mapping of data set options')
        if dataset.get('type') not in DATASET_REGISTRY:
            raise OptionError(f'unknown data set type {dataset.get("type")!r} (datasets.{phase}.type in {opt_path}); '
                              f'registered data sets: {_registered(DATASET_REGISTRY)}')
        backend = (dataset.get('io_backend') or {}).get('type', 'disk')
        for key in DATA_PATH_KEYS:
            value = dataset.get(key)
            if backend in ('disk', 'lmdb') and isinstance(value, str) and not osp.exists(osp.expanduser(value)):
                raise OptionError(f'data set path not found: {value} (datasets.{phase}.{key} in {opt_path})')

    paths = opt['path']
    if not isinstance(paths, dict):
        raise OptionError(f'{opt_path}: path must be a mapping (pretrain_network_g, resume_state, ...)')
    resuming = bool(paths.get('resume_state')) or (is_train and args.auto_resume and _has_state(opt, args))
    for key, value in paths.items():
        if isinstance(value, str) and (key == 'resume_state' or (key.startswith('pretrain_network') and not resuming)):
            if not osp.isfile(osp.expanduser(value)):
                raise OptionError(f'file not found: {value} (path.{key} in {opt_path})')

    num_gpu = opt['num_gpu']
    if num_gpu != 'auto' and not (isinstance(num_gpu, int) and num_gpu >= 0):
        raise OptionError(f'num_gpu must be a number or auto in {opt_path}, got {num_gpu!r}')
    if resolve_num_gpu(opt) > 0 and not torch.cuda.is_available():
        raise OptionError(f'num_gpu is {num_gpu} in {opt_path} but no CUDA device is available; '
                          f'use num_gpu: auto or 0 (e.g. --force_yml num_gpu=0) to run on the CPU')
    if args.launcher == 'pytorch' and 'RANK' not in os.environ:
        raise OptionError('--launcher pytorch runs under torchrun (RANK is not set), e.g. '
                          'torchrun --nproc_per_node=2 -m esc_arch.cli train -opt FILE.yml --launcher pytorch')
    if is_train:
        try:
            resolve_amp(opt['train'].get('amp'), torch.device('cpu'))
        except ValueError as exc:
            raise OptionError(f'{exc} ({opt_path})') from None


def _experiment_name(opt: dict, args) -> str:
    name = opt['name']
    return 'debug_' + name if args.debug and not name.startswith('debug') else name


def _has_state(opt: dict, args) -> bool:
    return latest_training_state(osp.join('experiments', _experiment_name(opt, args), 'training_states')) is not None


# ------------------------------------------------------------------------------ BasicSR patches
_RUN = {'cuda': False}
_ORIGINAL = {}


def _init_dist_pytorch(backend='nccl', **kwargs):
    import torch.distributed as dist
    if _RUN['cuda']:
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ['RANK']))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def _init_dist_slurm(backend='nccl', port=None):
    import subprocess

    import torch.distributed as dist
    if _RUN['cuda']:
        return _ORIGINAL['slurm'](backend, port)
    proc_id, ntasks = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
    addr = subprocess.getoutput(f'scontrol show hostname {os.environ["SLURM_NODELIST"]} | head -n1')
    os.environ['MASTER_PORT'] = str(port) if port is not None else os.environ.get('MASTER_PORT', '29500')
    os.environ.update(MASTER_ADDR=addr, WORLD_SIZE=str(ntasks), RANK=str(proc_id),
                      LOCAL_RANK=os.environ.get('SLURM_LOCALID', '0'))
    dist.init_process_group(backend='gloo')


def load_resume_state(opt):
    """BasicSR's ``load_resume_state``, mapped to the run's device, skipping unreadable states."""
    from basicsr.utils import check_resume
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        candidates = [osp.join(state_dir, f'{it}.state') for it in reversed(saved_iterations(state_dir))]
    else:
        candidates = [opt['path']['resume_state']] if opt['path'].get('resume_state') else []
    if not candidates:
        return None
    device = torch.device('cuda', torch.cuda.current_device()) if opt['num_gpu'] != 0 else torch.device('cpu')
    for index, path in enumerate(candidates):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            net_path = osp.join(opt['path']['models'], f'net_g_{state["iter"]}.pth')
            if opt['auto_resume'] and 'network_g' in opt and not osp.isfile(net_path):
                raise FileNotFoundError(f'its network {net_path} is missing')
        except Exception as exc:
            if index + 1 == len(candidates) or not opt['auto_resume']:
                raise
            print(f'Cannot resume from {path} ({exc}); trying {candidates[index + 1]}.', flush=True)
            continue
        opt['path']['resume_state'] = path
        check_resume(opt, state['iter'])
        return state


def _parse_options_wrapper(original):

    def parse_options(root_path, is_train=True):
        opt, args = original(root_path, is_train)
        if opt['num_gpu'] == 0:
            for dataset in opt['datasets'].values():
                if dataset.get('prefetch_mode') == 'cuda':
                    dataset['prefetch_mode'] = None
                    print(f'{dataset.get("name")}: prefetch_mode cuda needs a GPU; using the plain loader.', flush=True)
                dataset['pin_memory'] = False
        if not is_train:
            opt.setdefault('val', OrderedDict(save_img=True))
            opt['val'].setdefault('suffix', None)
            opt['val'].setdefault('save_img', True)
        return opt, args

    return parse_options


def patch_basicsr(use_cuda: bool) -> None:
    """Install the replacements listed in the module docstring (idempotent)."""
    import basicsr.test
    import basicsr.train
    from basicsr.utils import dist_util

    _RUN['cuda'] = use_cuda
    if not _ORIGINAL:
        _ORIGINAL['slurm'] = dist_util._init_dist_slurm
        dist_util._init_dist_pytorch = _init_dist_pytorch
        dist_util._init_dist_slurm = _init_dist_slurm
        basicsr.train.load_resume_state = load_resume_state
        basicsr.train.parse_options = _parse_options_wrapper(basicsr.train.parse_options)
        basicsr.test.parse_options = _parse_options_wrapper(basicsr.test.parse_options)


# ------------------------------------------------------------------------------ running
def run(command: str, args) -> int:
    """Check the options, then run BasicSR's pipeline for ``command`` ('train' or 'test')."""
    import torch.distributed as dist
    is_train = command == 'train'
    try:
        import_arch_modules(getattr(args, 'imports', None))
    except PluginImportError as exc:
        print(f'basicsr {command}: error: {exc}', file=sys.stderr)
        return 2
    try:
        opt = load_options(args.opt, args.force_yml)
        from esc_arch.data.demo import ensure_demo_data_for_options
        ensure_demo_data_for_options(opt)  # the embedded demo set is built on first use (idempotent)
        check_options(opt, args.opt, is_train, args)
    except OptionError as exc:
        print(f'basicsr {command}: error: {exc}', file=sys.stderr)
        return 2
    patch_basicsr(use_cuda=resolve_num_gpu(opt) > 0)

    argv = [f'basicsr {command}', '-opt', args.opt, '--launcher', args.launcher, '--local_rank', str(args.local_rank)]
    argv += ['--auto_resume'] * args.auto_resume + ['--debug'] * args.debug
    if args.force_yml:
        argv += ['--force_yml', *normalize_force_yml(args.force_yml)]
    saved_argv, sys.argv = sys.argv, argv
    try:
        if is_train:
            import basicsr.train
            basicsr.train.train_pipeline(os.getcwd())
        else:
            import basicsr.test
            basicsr.test.test_pipeline(os.getcwd())
    except TrainingDivergedError as exc:
        if not dist.is_initialized() or dist.get_rank() == 0:
            from basicsr.utils import get_root_logger
            get_root_logger().error(str(exc))
        return 1
    finally:
        sys.argv = saved_argv
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
