"""What ``basicsr train`` and ``basicsr test`` share.

Both run BasicSR's own ``train_pipeline`` / ``test_pipeline`` with the flags of BasicSR's
scripts. Before that, the option file is read and checked here, so a mistake (a YAML that does
not parse, an unknown arch or model, a missing data set) is one line naming the file, not a
traceback. A few BasicSR functions are replaced, never edited, for CPU and CPU-DDP runs:

* ``dist_util._init_dist_pytorch`` / ``_init_dist_slurm``: gloo and no ``torch.cuda.set_device``
  when the run is on CPU; the device of a CUDA run is chosen by ``LOCAL_RANK``.
* ``train.load_resume_state``: maps a state to the run's device (BasicSR always maps to CUDA),
  checks that the options' network and optimizer are the state's and that it is not past ``total_iter``
  and, with ``--auto_resume``, falls back to an older state if the newest (or its network file) cannot be read.
* ``train.create_train_val_dataloader``: the epoch count from the training loader's real length
  (it drops the last partial batch) and, resuming, from the saved epoch, so training reaches
  ``total_iter`` (a state saved with a larger batch size is at a later epoch than this run counts).
* the training loader's ``worker_init_fn``: the workers' ``random``/NumPy seeds differ between
  epochs (BasicSR's repeat every epoch, as its workers restart, so do the crops and flips).
* the image data sets' ``imfrombytes`` / ``__getitem__`` and ``FileClient.get``: an image OpenCV cannot
  decode, or a file that cannot be read three times, is an ``ImageDecodeError`` naming its files
  (BasicSR fails on ``None.astype`` without a name, and RealESRGANDataset reads other files at random,
  up to an IndexError), also in spawned loader workers (DDP), which apply these patches when they start.
* ``train/test.parse_options``: on CPU, ``prefetch_mode: cuda`` becomes the plain loader;
  ``dist`` follows ``--launcher`` even when ``--force_yml`` sets it; under DDP the training
  loader's workers persist across epochs (``persistent_workers``, unless the options say, or
  ``prefetch_mode: cpu``).
* the Real-ESRNet/GAN models (``realesrnet_model`` / ``realesrgan_model``): their degradation
  helpers (``DiffJPEG``, ``USMSharp``) stay on the CPU in a CPU run instead of ``.cuda()`` (and
  give contiguous outputs there), and the training-pair queue is made on the batch's device.
* ``vgg_arch.VGGFeatureExtractor`` (the perceptual loss): a failed download of its ImageNet
  weights is one line saying which file to put where, not a urllib traceback.
* ``train.build_model``: the model's ``validation`` labels the final validation, after the loop,
  ``total_iter`` (BasicSR passes its loop counter, one past the end: images ``*_1001.png`` and a
  TensorBoard point at 1001 for a 1000-iteration run).
* ``train.MessageLogger``: the eta counts the iterations left (BasicSR's one fewer: the last
  line said 'eta: -1 day, 23:59:59').
* ``file_client.LmdbBackend``: data sets reading one LMDB share its environment (opened once per
  path and process, read-only), where LMDB refuses to open a database a second time in a process or
  in a loader worker forked from it: training and validating on one LMDB failed at the first
  validation (``already open in this process``), or at the next epoch with loader workers.
* ``base_model.BaseModel.load_network``: BasicSR's own models (``SRModel``, ``SwinIRModel``, ...) read
  their pretrained networks as ``ESCSRModel`` does and as the option checks read them (a ``.safetensors``
  file, a bare state dict or one under another wrapper key); BasicSR's failed on those after the checks
  had passed them (``KeyError: 'params'``, safetensors' 'callable map_location is not supported').
* ``train.build_model`` / the training sampler: a Ctrl-C or SIGTERM stops the run at the end of the
  iteration under way, saved (``_stopping``).
* ``Registry.get``: a name BasicSR registered with its ``_basicsr`` suffix
  (``UNetDiscriminatorSN``) is found without BasicSR's 'Name ... is not found' line.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import re
import sys
from collections import OrderedDict
from os import path as osp

import torch
import yaml

from ..arch_options import SCALE_KEYS, default_scale, options_problem
from ..archs.layers import is_flashbias
from ..data.lmdb_envs import shared_lmdb
from ..loading import CheckpointError, describe_mismatch, infer_config
from ..messages import OptionError, environment_problem, first_line
from ..models.esr_model import (
    ESCSRModel,
    TrainingStoppedError,
    latest_training_state,
    pretrained_state_dict,
    resolve_amp,
    saved_iterations,
)
from ..plugins import PluginImportError, add_import_argument, import_arch_modules
from . import _data_checks, _real_checks, _stopping

DATA_PATH_KEYS = ('dataroot_gt', 'dataroot_lq', 'dataroot', 'meta_info_file', 'meta_info')


def add_arguments(parser: argparse.ArgumentParser, is_train: bool = True) -> None:
    """The flags of BasicSR's ``train.py`` / ``test.py`` (``basicsr.utils.options.parse_options``,
    which takes the same ones for both)."""
    parser.add_argument('-opt', required=True, metavar='FILE.yml', help='path to the option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: pytorch under torchrun (gloo on CPU, nccl on CUDA), or slurm')
    parser.add_argument('--auto_resume', action='store_true',
                        help='continue from the newest state in experiments/<name>/training_states' if is_train
                        else 'accepted as BasicSR\'s test.py does; a test run has nothing to resume')
    parser.add_argument('--debug', action='store_true',
                        help='debug run: name prefixed debug_, frequent logs' if is_train
                        else 'name prefixed debug_ (results/debug_<name>)')
    parser.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=0,
                        help='set by torch.distributed.launch; torchrun uses LOCAL_RANK instead')
    parser.add_argument('--force_yml', nargs='+', action='extend', default=None, metavar='KEY=VALUE',
                        help='override options, e.g. train:ema_decay=0.999 num_gpu=0 (repeated flags add up)')
    add_import_argument(parser, 'network_g can name')


# ------------------------------------------------------------------------------ options
_NUMBER = re.compile(r'^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$')
_EXPONENT_FLOAT = re.compile(r'^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$')


def normalize_force_yml(entries):
    """``key=1e-4`` as ``key=!!float 1e-4``: BasicSR's parser would keep such a number a string
    (words Python's float() also takes, such as nan, inf or 1_000, stay strings); ``key=null``
    (YAML's null) as ``key=~``, which BasicSR's parser takes for None (it kept 'null' a string)."""
    normalized = []
    for entry in entries or ():
        key, sep, value = entry.partition('=')
        number = value.strip()
        if _NUMBER.match(number) and not number.replace('.', '', 1).isdigit():
            value = f'!!float {number}'
        elif number.lower() == 'null':
            value = '~'
        normalized.append(key + sep + value)
    return normalized


_SIGNED_WHOLE = re.compile(r'^!!float\s*[-+][0-9]+$')  # a normalized -1 / +2


def signed_whole_numbers(entries) -> list[tuple[list[str], int]]:
    """(key path, int) of the normalized ``--force_yml`` entries that are signed whole numbers
    (``save_checkpoint_freq=-1``): BasicSR's parser knows no signed int, ``!!float`` makes them
    floats, and they are put back as ints."""
    found = []
    for entry in entries or ():
        key, _, value = entry.partition('=')
        if _SIGNED_WHOLE.match(value.strip()):
            found.append(([part.strip() for part in key.split(':')], int(value.strip()[len('!!float'):])))
    return found


def read_exponent_floats(loader) -> None:
    """Make ``loader`` (BasicSR's YAML loader class) read ``1e-3`` as a number: PyYAML follows YAML
    1.1, whose floats need a dot (``1.0e-3``), and keeps ``lr: 1e-3`` a string that only fails
    deep inside the optimizer. Installed once on the class, so BasicSR's own parse sees it too."""
    if not getattr(loader, '_esc_exponent_floats', False):
        loader.add_implicit_resolver('tag:yaml.org,2002:float', _EXPONENT_FLOAT, list('-+0123456789.'))
        loader._esc_exponent_floats = True


def load_options(opt_path: str, force_yml=None) -> dict:
    """Parse the option file as BasicSR does and apply ``--force_yml``; OptionError if it fails."""
    from basicsr.utils.options import _postprocess_yml_value, ordered_yaml

    if not osp.isfile(opt_path):
        raise OptionError(f'option file {opt_path} is a folder' if osp.isdir(opt_path)
                          else f'option file not found: {opt_path}')
    loader = ordered_yaml()[0]
    read_exponent_floats(loader)
    try:
        with open(opt_path) as file:
            opt = yaml.load(file, Loader=loader)
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
        if not all(part.strip() for part in (*parents, last)):
            raise OptionError(f'--force_yml {entry!r}: an empty key; expected KEY=VALUE, with KEY like train:ema_decay')
        node = opt
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise OptionError(f'--force_yml {entry!r}: {opt_path} has no section {key!r} on that path')
            node = node[key]
        try:
            node[last] = _postprocess_yml_value(value)  # lists go through eval(), as in BasicSR
            for _, number in signed_whole_numbers([entry]):
                node[last] = number
        except Exception as exc:
            raise OptionError(f'--force_yml {entry!r}: cannot read the value {value!r} '
                              f'({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})') from None
    return opt


def resolve_num_gpu(opt: dict) -> int:
    num_gpu = opt['num_gpu']
    return torch.cuda.device_count() if num_gpu == 'auto' else int(num_gpu)


def _registered(registry) -> str:
    """The names ``registry.get`` takes, as option files write them (BasicSR's own archs and data
    sets are registered with a ``_basicsr`` suffix when another package takes their name first:
    ``get`` finds them without it)."""
    return ', '.join(sorted({name.removesuffix('_basicsr') for name in registry.keys()}))


# the models whose training step and set-up are ESCSRModel's (SRModel's underneath)
ESC_STEP_MODELS = ('ESCSRModel', 'ESRModel', 'ESCRealESRNetModel', 'RealHATMSEModel')
# what ESCSRModel (and BasicSR's SRModel under it) reads from train:
TRAIN_KEYS = ('total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'scheduler', 'pixel_opt', 'perceptual_opt',
              'grad_clip', 'amp')
# the GAN stage's (SRGANModel's set-up and Real-ESRGAN's step: no amp, no grad_clip)
GAN_STEP_MODELS = ('ESCRealESRGANModel', 'RealHATGANModel')
GAN_TRAIN_KEYS = ('total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'optim_d', 'scheduler', 'pixel_opt',
                  'ldl_opt', 'perceptual_opt', 'gan_opt', 'net_d_iters', 'net_d_init_iters')


def _warn_unread_keys(opt: dict, section: str, known: tuple) -> None:
    """A misspelt train or val key (``gradclip``, ``metric``) is otherwise silently ignored."""
    import difflib
    if opt.get('model_type') not in ESC_STEP_MODELS + GAN_STEP_MODELS or not isinstance(opt.get(section), dict):
        return
    if section == 'train' and opt['model_type'] in GAN_STEP_MODELS:  # for every caller: the GAN stage reads others
        known = GAN_TRAIN_KEYS
    for key in opt[section]:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f' (did you mean {close[0]}?)' if close else ''
            print(f'warning: {section}.{key} is not an option {opt["model_type"]} reads; it is ignored{hint}',
                  file=sys.stderr)


# top-level keys other code bases read that BasicSR does not: the train key that does it here
FOREIGN_TOP_KEYS = {'use_amp': 'amp'}


def _warn_top_level_train_keys(opt: dict) -> None:
    """``use_amp: true`` (a fork's switch) or ``grad_clip`` put at the top level is otherwise silently ignored."""
    if opt.get('model_type') not in ESC_STEP_MODELS + GAN_STEP_MODELS:
        return
    known = GAN_TRAIN_KEYS if opt['model_type'] in GAN_STEP_MODELS else TRAIN_KEYS
    for key in opt:
        meant = FOREIGN_TOP_KEYS.get(key, key)
        if meant in known:
            print(f'warning: {key} at the top level is not an option {opt["model_type"]} reads; it is ignored '
                  f'(set train.{meant}{": bf16 or fp16" if meant == "amp" else ""} instead)', file=sys.stderr)


# what BasicSR reads from path (the rest it sets itself); a near miss of one is a typo
PATH_KEYS = ('pretrain_network_g', 'param_key_g', 'strict_load_g', 'resume_state', 'pretrain_network_d',
             'param_key_d', 'strict_load_d', 'ignore_resume_networks', 'experiments_root', 'models',
             'training_states', 'log', 'visualization', 'results_root', 'root')


# what BasicSR's parse_options sets itself, from the run's name (an option's value is overwritten)
SET_PATH_KEYS = ('experiments_root', 'models', 'training_states', 'log', 'visualization', 'results_root')


def _check_path_keys(paths: dict, opt_path: str) -> None:
    """``pretrained_network_g`` is not read, and BasicSR makes a folder of its value."""
    import difflib
    for key in SET_PATH_KEYS:
        if paths.get(key) is not None:
            print(f'warning: path.{key} is set by BasicSR from the run\'s name (experiments/<name>/..., '
                  f'results/<name>/...); {paths[key]!r} in {opt_path} is ignored', file=sys.stderr)
    for key in paths:
        close = difflib.get_close_matches(key, PATH_KEYS, n=1, cutoff=0.8) if key not in PATH_KEYS else None
        if close:
            raise OptionError(f'path.{key} is not an option BasicSR reads (did you mean {close[0]}?) in {opt_path}')


def _check_scheduler(settings: dict, where: str) -> None:
    """The scheduler's arguments, named and typed as its class takes them (BasicSR passes them
    straight to it: a typo or a string fails after start-up, a string gamma only at a milestone)."""
    from basicsr.models import lr_scheduler
    cls = {'MultiStepLR': lr_scheduler.MultiStepRestartLR, 'MultiStepRestartLR': lr_scheduler.MultiStepRestartLR,
           'CosineAnnealingRestartLR': lr_scheduler.CosineAnnealingRestartLR}[settings['type']]
    kwargs = {k: v for k, v in settings.items() if k != 'type'}
    problem = options_problem(cls, kwargs, supplied=('optimizer', 'last_epoch'))
    if problem:
        raise OptionError(f'{settings["type"]}: {problem} ({where})')
    whole_lists, number_lists = ('milestones', 'restarts', 'periods'), ('restart_weights', )
    for key, value in kwargs.items():
        if key in whole_lists + number_lists:
            whole = key in whole_lists
            if not (isinstance(value, (list, tuple))
                    and all(_is_number(v) and (not whole or float(v).is_integer()) for v in value)):
                raise OptionError(f'{key} must be a list of {"whole numbers" if whole else "numbers"}, '
                                  f'got {value!r} ({where})')
        elif key in ('gamma', 'eta_min') and not _is_number(value):
            raise OptionError(f'{key} must be a number, got {value!r} ({where})')


SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')  # what BasicSR's models build
VAL_KEYS = ('val_freq', 'save_img', 'suffix', 'metrics', 'pbar')  # what SRModel's validation reads


def _known(registry, name) -> bool:
    """Whether ``registry.get(name)`` finds it (BasicSR registers some names with a ``_basicsr``
    suffix, e.g. RealESRGANModel_basicsr, and ``get`` falls back to that)."""
    return isinstance(name, str) and (name in registry or f'{name}_basicsr' in registry)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_networks(opt: dict, opt_path: str) -> None:
    """Each ``network_*`` names a registered arch and options that build it."""
    from basicsr.utils.registry import ARCH_REGISTRY
    for key, net_opt in opt.items():
        if key.startswith('network_'):
            net_type = net_opt.get('type') if isinstance(net_opt, dict) else None
            if not _known(ARCH_REGISTRY, net_type):
                raise OptionError(f'unknown arch {net_type!r} ({key}.type in {opt_path}); registered archs: '
                                  f'{_registered(ARCH_REGISTRY)}')
            arch = ARCH_REGISTRY.get(net_type)
            options = {k: v for k, v in net_opt.items() if k != 'type'}
            ours = getattr(arch, '__module__', '').startswith('esc_arch.')
            problem = options_problem(arch, options)
            if problem:
                raise OptionError(f'{arch.__name__}: {problem} ({key} in {opt_path})')
            if ours:  # what only the constructor checks (use_dysample: true, sizes that do not divide)
                try:
                    with torch.device('meta'):  # no weights allocated or initialised
                        arch(**options)
                except (ValueError, TypeError) as exc:
                    said = first_line(exc)
                    raise OptionError(f'{"" if said.startswith(arch.__name__) else arch.__name__ + ": "}{said} '
                                      f'({key} in {opt_path})') from None


def _check_scale(opt: dict, opt_path: str) -> None:
    """The network's own upscaling factor must be the run's ``scale`` (BasicSR would crop or mis-size
    the output and report wrong metrics, or fail later with a shape error)."""
    scale, net_opt = opt.get('scale'), opt['network_g']
    if scale is not None and not _data_checks.is_whole(scale, 1):
        raise OptionError(f'scale must be a whole number >= 1 in {opt_path}, got {scale!r}')
    if scale is None:
        return
    for key in SCALE_KEYS:
        if key in net_opt and net_opt[key] != scale:
            raise OptionError(f'network_g.{key} is {net_opt[key]} but scale is {scale} in {opt_path}; they must agree')
    if not any(key in net_opt for key in SCALE_KEYS):
        from basicsr.utils.registry import ARCH_REGISTRY
        default = default_scale(ARCH_REGISTRY.get(net_opt['type']))
        if default and default[1] != scale:
            raise OptionError(f'network_g ({net_opt["type"]}) upscales x{default[1]} ({default[0]} defaults to '
                              f'{default[1]}) but scale is {scale} in {opt_path}: set network_g.{default[0]}: {scale}')


def _check_train_section(opt: dict, opt_path: str) -> None:
    import basicsr.losses  # noqa: F401  (fill the registry)
    from basicsr.utils.registry import LOSS_REGISTRY

    train = opt['train']
    if not isinstance(train, dict):
        raise OptionError(f'{opt_path}: train must be a mapping (total_iter, optim_g, scheduler, ...)')
    total = train.get('total_iter')
    if not (_is_number(total) and total > 0 and float(total).is_integer()):
        raise OptionError(f'train.total_iter must be a positive whole number in {opt_path}, got {total!r}')
    for key in ('warmup_iter', 'ema_decay', 'grad_clip'):
        if train.get(key) is not None and not _is_number(train[key]):
            raise OptionError(f'train.{key} must be a number in {opt_path}, got {train[key]!r}')
    if _is_number(train.get('ema_decay')) and train['ema_decay'] >= 1:
        raise OptionError(f'train.ema_decay must be below 1 in {opt_path} (0 or less: no EMA), '
                          f'got {train["ema_decay"]!r}: at 1 the EMA network never moves from its start, '
                          'above it it runs away')
    if _is_gan_model(opt.get('model_type')) and not isinstance(opt.get('network_d'), dict):  # a KeyError later
        raise OptionError(f'{opt["model_type"]} trains a discriminator: it needs network_d (e.g. type: '
                          f'UNetDiscriminatorSN, num_in_ch: 3, num_feat: 64, skip_connection: true) in {opt_path}')
    if _is_gan_model(opt.get('model_type')):
        _check_gan_train_settings(opt, train, opt_path)
    for key, value in train.items():
        if not isinstance(value, dict):
            if (key.startswith('optim_') or key == 'scheduler' or key.endswith('_opt')) and value is not None:
                raise OptionError(f'train.{key} must be a mapping of options (type: ..., ...) in {opt_path}, got '
                                  f'{value!r} (--force_yml sets strings and numbers only: write mappings in the file)')
            continue
        if key.startswith('optim_') and not isinstance(opt.get(f'network_{key[6:]}'), dict):
            # e.g. the authors' ESC-Real MSE file keeps its GAN run's optim_d: RealESRNetModel reads none
            print(f'warning: train.{key} is not used: there is no network_{key[6:]}', file=sys.stderr)
        elif key.startswith('optim_'):
            if not _is_number(value.get('lr')):
                raise OptionError(f'train.{key}.lr must be a number in {opt_path}, got {value.get("lr")!r}')
            _check_optimizer(opt, key, value, opt_path)
        elif key == 'scheduler' and value.get('type') not in SCHEDULERS:
            raise OptionError(f'unknown scheduler {value.get("type")!r} (train.scheduler.type in {opt_path}); '
                              f'BasicSR has: {", ".join(SCHEDULERS)}')
        elif key == 'scheduler':
            _check_scheduler(value, f'train.scheduler in {opt_path}')
        elif key.endswith('_opt') and not _known(LOSS_REGISTRY, value.get('type')):
            raise OptionError(f'unknown loss {value.get("type")!r} (train.{key}.type in {opt_path}); '
                              f'registered losses: {_registered(LOSS_REGISTRY)}')
    model = opt.get('model_type')
    if model in ESC_STEP_MODELS + ('SRModel', 'SwinIRModel', 'RealESRNetModel'):  # SRModel's set-up
        if not isinstance(train.get('optim_g'), dict):
            raise OptionError(f'{opt_path}: train.optim_g is missing (e.g. type: Adam, lr: 2e-4, betas: [0.9, 0.99])')
        if not isinstance(train.get('scheduler'), dict):
            raise OptionError(f'{opt_path}: train.scheduler is missing (e.g. type: MultiStepLR, milestones, gamma)')
        if not isinstance(train.get('pixel_opt'), dict) and not isinstance(train.get('perceptual_opt'), dict):
            raise OptionError(f'{opt_path}: train needs a pixel_opt or perceptual_opt loss (e.g. pixel_opt: '
                              '{type: L1Loss, loss_weight: 1.0})')
    scheduler = train.get('scheduler')
    if isinstance(scheduler, dict) and scheduler.get('type') == 'CosineAnnealingRestartLR':
        periods, weights = scheduler.get('periods') or [], scheduler.get('restart_weights') or [1]
        if len(periods) != len(weights):
            raise OptionError(f'train.scheduler: {len(periods)} periods but {len(weights)} restart_weights '
                              f'in {opt_path}; give one weight per period')
        if sum(periods) < total:
            raise OptionError(f'train.scheduler: the periods add up to {sum(periods)}, fewer than total_iter {total:g} '
                              f'in {opt_path} (CosineAnnealingRestartLR has no lr past them)')
    val, logger = opt.get('val'), opt.get('logger')
    if not isinstance(logger, dict):
        raise OptionError(f'{opt_path}: logger must be a mapping (print_freq, save_checkpoint_freq, ...)')
    frequencies = [('logger', 'print_freq', logger.get('print_freq')),
                   ('logger', 'save_checkpoint_freq', logger.get('save_checkpoint_freq'))]
    if isinstance(val, dict):
        frequencies.append(('val', 'val_freq', val.get('val_freq')))
    for section, key, value in frequencies:  # BasicSR takes current_iter % value
        if not (_is_number(value) and value >= 1 and float(value).is_integer()):
            raise OptionError(f'{opt_path}: {section}.{key} must be a whole number of iterations >= 1, got {value!r}')


def _check_gan_train_settings(opt: dict, train: dict, opt_path: str) -> None:
    """What SRGANModel's set-up and step read without a default (a KeyError, or an AttributeError
    at the first iteration) or divide by."""
    model = opt['model_type']
    for key, example in (('optim_g', 'type: Adam, lr: 1e-4, betas: [0.9, 0.99]'),
                         ('optim_d', 'type: Adam, lr: 1e-4, betas: [0.9, 0.99]'),
                         ('gan_opt', 'type: GANLoss, gan_type: vanilla, loss_weight: 0.1')):
        if not isinstance(train.get(key), dict):
            raise OptionError(f'{model} needs train.{key} (e.g. {example}) in {opt_path}')
    for key, least in (('net_d_iters', 1), ('net_d_init_iters', 0)):
        value = train.get(key, least)
        if not (_is_number(value) and float(value).is_integer() and value >= least):
            raise OptionError(f'train.{key} must be a whole number >= {least} in {opt_path}, got {value!r}')
    if (isinstance(train.get('ldl_opt'), dict) and _real_checks.real_model_kind(model) == 'esrgan'
            and not (_is_number(train.get('ema_decay')) and train['ema_decay'] > 0)):
        raise OptionError(f'train.ldl_opt compares the output with the EMA network\'s: it needs train.ema_decay '
                          f'above 0 (e.g. 0.999) in {opt_path}')
    in_channels = opt['network_d'].get('num_in_ch')
    if _is_number(in_channels) and in_channels != 3 and opt['network_g'].get('type') in ('ESC', 'ESCFP', 'ESCReal'):
        raise OptionError(f'network_d.num_in_ch is {in_channels}, but {opt["network_g"]["type"]} outputs 3 channels '
                          f'(RGB) in {opt_path}')


def _is_model_of(model_type, base: type) -> bool:
    """Whether ``model_type`` names a registered model class derived from ``base``."""
    from basicsr.utils.registry import MODEL_REGISTRY
    model = MODEL_REGISTRY.get(model_type) if _known(MODEL_REGISTRY, model_type) else None
    return isinstance(model, type) and issubclass(model, base)


def _is_gan_model(model_type) -> bool:
    """Whether the model builds a discriminator (BasicSR's SRGANModel family)."""
    from basicsr.models.srgan_model import SRGANModel
    return _is_model_of(model_type, SRGANModel)


def _dummy_optimizer(model_type: str, settings: dict):
    """The optimizer ``settings`` (train.optim_*) make, built as the model will (its
    ``get_optimizer``: BasicSR's own models take Adam only) on a dummy parameter; the model's or
    torch's exception if it cannot be."""
    from basicsr.utils.registry import MODEL_REGISTRY
    kwargs = {k: v for k, v in settings.items() if k not in ('type', 'lr')}
    return MODEL_REGISTRY.get(model_type).get_optimizer(None, settings.get('type'),
                                                        [torch.zeros(1, requires_grad=True)], settings.get('lr'),
                                                        **kwargs)


def _check_optimizer(opt: dict, key: str, settings: dict, opt_path: str) -> None:
    """An unknown optimizer type or argument is one line here, not a traceback after start-up."""
    try:
        _dummy_optimizer(opt['model_type'], settings)
    except Exception as exc:
        raise OptionError(f'train.{key} ({settings.get("type")}) cannot be built for {opt["model_type"]}: '
                          f'{first_line(exc).replace("optim_g", key)} ({opt_path})') from None


def _check_metrics(opt: dict, opt_path: str) -> None:
    """Each metric's type and arguments (BasicSR calls it with them at the first validation, after
    the training so far is lost), and full-reference metrics only on data sets with GT images."""
    import inspect

    import basicsr.metrics  # noqa: F401  (fill the registry)
    from basicsr.utils.registry import METRIC_REGISTRY

    metrics = (opt.get('val') or {}).get('metrics') or {}
    if not isinstance(metrics, dict):
        raise OptionError('val.metrics must be a mapping of metrics (psnr: {type: calculate_psnr, ...}) '
                          f'in {opt_path}')
    needs_gt = []
    for name, metric in metrics.items():
        kind = metric.get('type') if isinstance(metric, dict) else None
        if not _known(METRIC_REGISTRY, kind):
            raise OptionError(f'unknown metric {kind!r} (val.metrics.{name}.type in {opt_path}); '
                              f'registered metrics: {_registered(METRIC_REGISTRY)}')
        where = f'val.metrics.{name} in {opt_path}'
        if kind.endswith('_pt') and _validates_on_arrays(opt.get('model_type')):
            raise OptionError(f'{kind} takes tensors, but {opt["model_type"]} validates on uint8 images (arrays): '
                              f'use {kind[:-3]} ({where})')
        function = METRIC_REGISTRY.get(kind)
        arguments = {k: v for k, v in metric.items() if k not in ('type', 'better')}
        params = list(inspect.signature(function).parameters)
        images = tuple(params[:2] if 'img2' in params else params[:1])  # what the model passes
        # BasicSR's own metrics take **kwargs they never read: a misspelt argument is unknown there
        problem = options_problem(function, arguments, supplied=images,
                                  names_only=function.__module__.startswith('basicsr.'))
        if problem:
            raise OptionError(f'{kind}: {problem} ({where})')
        if 'crop_border' in arguments and not _data_checks.is_whole(arguments['crop_border'], 0):
            raise OptionError(f'crop_border must be a whole number >= 0, got {arguments["crop_border"]!r} ({where})')
        if not isinstance(arguments.get('test_y_channel', False), bool):
            raise OptionError(f'test_y_channel must be true or false, got {arguments["test_y_channel"]!r} ({where})')
        if metric.get('better', 'higher') not in ('higher', 'lower'):
            raise OptionError(f'better must be higher or lower, got {metric["better"]!r} ({where})')
        if len(images) == 2:
            needs_gt.append(name)
    for phase, dataset in opt['datasets'].items():
        if needs_gt and phase.split('_')[0] in ('val', 'test') and dataset.get('type') == 'SingleImageDataset':
            raise OptionError(f'val.metrics {", ".join(needs_gt)} compare with GT images, but datasets.{phase} '
                              f'(SingleImageDataset) has none, in {opt_path}: remove them (calculate_niqe needs no GT) '
                              'or use a PairedImageDataset with dataroot_gt')


def _validates_on_arrays(model_type) -> bool:
    """Whether the model validates as BasicSR's SRModel family does (its own and ours), giving the
    metrics numpy uint8 images; a model of another package may have its own validation."""
    from basicsr.models.sr_model import SRModel
    from basicsr.utils.registry import MODEL_REGISTRY
    return (_is_model_of(model_type, SRModel)
            and MODEL_REGISTRY.get(model_type).nondist_validation.__module__.startswith(('basicsr.', 'esc_arch.')))


def _check_gives_lq(opt: dict, phase: str, dataset: dict, is_train: bool, where: str) -> None:
    """A data set of GT images alone where SRModel's family reads LQ images (BasicSR: a KeyError at the
    first iteration, or at the first validation, after training): everywhere but a real-world model's
    training (checked with its degradation) and a training's val set without a val section (unread)."""
    training = phase.startswith('train')
    reads_lq = _real_checks.real_model_kind(opt['model_type']) is None if training else (
        not is_train or opt.get('val') is not None)
    if dataset.get('type') in _data_checks.GT_ONLY and reads_lq and _validates_on_arrays(opt['model_type']):
        instead = ('a real-world model (e.g. ESCRealESRNetModel), which degrades the GT images itself' if training
                   else 'a SingleImageDataset')
        raise OptionError(f'{dataset["type"]} gives GT images only, but {opt["model_type"]} '
                          f'{"trains" if training else "validates" if is_train else "tests"} on LQ images: use a '
                          f'PairedImageDataset (dataroot_gt and dataroot_lq) or {instead} ({where})')


def _world_size(args) -> int:
    """How many training processes the launcher starts (torchrun's WORLD_SIZE, Slurm's tasks)."""
    variable = {'pytorch': 'WORLD_SIZE', 'slurm': 'SLURM_NTASKS'}.get(getattr(args, 'launcher', 'none'))
    try:
        return max(1, int(os.environ.get(variable, 1))) if variable else 1
    except ValueError:
        return 1


def _check_network_fits(net_opt: dict, state_dict: dict, what: str, key: str = 'network_g') -> None:
    """``state_dict`` loads strictly into the network ``net_opt`` builds (its load hooks included,
    e.g. ESC's cross-scale ``to_img``), or OptionError naming the differences (and, for weights
    of another ESC variant, which one they are)."""
    from basicsr.utils.registry import ARCH_REGISTRY
    kwargs = copy.deepcopy(net_opt)
    try:  # not basicsr's build_network: its log line would set up the logger before the run gives it its file
        net = ARCH_REGISTRY.get(kwargs.pop('type'))(**kwargs)
    except Exception as exc:
        raise OptionError(f'cannot build {key} {net_opt.get("type")}: {type(exc).__name__}: '
                          f'{str(exc).splitlines()[0] if str(exc) else ""}') from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        problems = describe_mismatch(net, state_dict) or str(exc).strip().splitlines()[-1].strip()
        try:
            arch, config = infer_config(state_dict)
        except CheckpointError:
            arch = None
        other = (f' it is an {arch} x{config["upscaling_factor"]} checkpoint;' if arch and arch != net_opt.get('type')
                 else '')
        if arch and 'flashbias_rank' in config and not is_flashbias(net_opt.get('attn_type')):
            other += (f' it is a FlashBias checkpoint (attn_type: FlashBias, flashbias_rank: '
                      f'{config["flashbias_rank"]});')
        raise OptionError(f'{what} does not fit {key} ({net_opt.get("type")}):{other} {problems}') from None


def _check_pretrained(opt: dict, opt_path: str, is_train: bool = True) -> None:
    paths = opt['path']
    for suffix in ('g', 'd'):
        load_path, net_opt = paths.get(f'pretrain_network_{suffix}'), opt.get(f'network_{suffix}')
        if not (isinstance(load_path, str) and isinstance(net_opt, dict)):
            continue
        what = f'{load_path} (path.pretrain_network_{suffix} in {opt_path})'
        try:
            state_dict, _ = pretrained_state_dict(osp.expanduser(load_path), paths.get(f'param_key_{suffix}', 'params'))
        except CheckpointError as exc:
            raise OptionError(f'{exc} (path.pretrain_network_{suffix} in {opt_path})') from None
        if paths.get(f'strict_load_{suffix}', True):  # first: weights of another arch are that, whatever their scale
            _check_network_fits(net_opt, state_dict, what, f'network_{suffix}')  # another scale's to_img: below
        to_img = state_dict.get('to_img.weight')
        if suffix == 'g' and not is_train and net_opt.get('type') in ('ESC', 'ESCFP') \
                and isinstance(to_img, torch.Tensor) and to_img.shape[0] != 3 * net_opt.get('upscaling_factor', 0) ** 2:
            # ESC re-samples another scale's to_img as it loads: a training start, not weights to test
            trained = math.isqrt(to_img.shape[0] // 3)
            raise OptionError(f'{what} is an x{trained} checkpoint but network_g is '
                              f'x{net_opt.get("upscaling_factor")}: testing needs weights trained at that scale '
                              '(re-sampling another scale\'s to_img only starts a training)')


def check_options(opt: dict, opt_path: str, is_train: bool, args) -> None:
    """Everything BasicSR would only find out with a traceback (or after minutes of start-up)."""
    import basicsr.archs  # noqa: F401  (fill the registries)
    import basicsr.data  # noqa: F401
    import basicsr.models  # noqa: F401
    from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

    required = ['name', 'model_type', 'num_gpu', 'datasets', 'network_g', 'path'] + (['train', 'logger'] * is_train)
    missing = [key for key in required if key not in opt]
    if missing:
        raise OptionError(f'{opt_path} lacks the option(s) {", ".join(missing)}')
    name = opt['name']
    if not isinstance(name, str) or name.strip() in ('', '.', '..') or '/' in name or os.sep in name:
        raise OptionError(f'name must be a folder name (not empty, no "/"; quote a number), got {name!r} in '
                          f'{opt_path}: BasicSR makes experiments/<name> and results/<name> from it, archiving '
                          'what is there')
    if not _known(MODEL_REGISTRY, opt['model_type']):
        raise OptionError(f'unknown model_type {opt["model_type"]!r} in {opt_path}; registered models: '
                          f'{_registered(MODEL_REGISTRY)}')
    _check_networks(opt, opt_path)
    _check_scale(opt, opt_path)

    datasets = opt['datasets']
    if not isinstance(datasets, dict) or not datasets:
        raise OptionError(f'{opt_path}: datasets must name at least one data set')
    if is_train and 'train' not in datasets:
        raise OptionError(f'{opt_path}: datasets has no train entry (found {", ".join(datasets)})')
    phases = ('train', 'val') if is_train else ('test', 'val')
    for phase, dataset in datasets.items():
        if phase.split('_')[0] not in phases:
            raise OptionError(f'{opt_path}: data set {phase!r} must be named {" or ".join(phases)} (or *_N)')
        if is_train and phase.startswith('train') and phase != 'train':  # BasicSR: "not recognized"
            raise OptionError(f'{opt_path}: data set {phase!r}: BasicSR trains on one data set, datasets.train '
                              '(to train on several folders, list them in one data set or merge them)')
        if not isinstance(dataset, dict):
            raise OptionError(f'{opt_path}: datasets.{phase} must be a mapping of data set options')
        if not _known(DATASET_REGISTRY, dataset.get('type')):
            raise OptionError(f'unknown data set type {dataset.get("type")!r} (datasets.{phase}.type in {opt_path}); '
                              f'registered data sets: {_registered(DATASET_REGISTRY)}')
        io_backend = dataset.get('io_backend') or {}
        # not a mapping: refused by check_required_keys below (BasicSR: "string indices must be integers")
        backend = io_backend.get('type', 'disk') if isinstance(io_backend, dict) else None
        for key in DATA_PATH_KEYS:
            value = dataset.get(key)
            if backend == 'lmdb' and key.startswith('meta_info'):
                continue  # an LMDB's own meta_info.txt is read; BasicSR ignores this key there
            if backend in ('disk', 'lmdb') and isinstance(value, str) and not osp.exists(osp.expanduser(value)):
                raise OptionError(f'data set path not found: {value} (datasets.{phase}.{key} in {opt_path})')
        where = f'datasets.{phase} in {opt_path}'
        _data_checks.check_required_keys(phase, dataset, opt, where)
        _check_gives_lq(opt, phase, dataset, is_train, where)
        if is_train and phase.startswith('train') and dataset.get('type') == 'RealESRGANDataset':
            _real_checks.check_real_dataset_options(dataset, where)
        if phase == 'train':
            _data_checks.check_loader_settings(dataset, where)
        _data_checks.check_images(opt, phase, dataset, opt_path, _world_size(args))
        _data_checks.check_meta_info_list(phase, dataset, opt_path, _world_size(args))
    _warn_shared_set_names(datasets, opt_path)
    _check_metrics(opt, opt_path)
    if is_train:
        _real_checks.check_real_model_options(opt, opt_path)
        _check_train_section(opt, opt_path)
        _warn_unread_keys(opt, 'train', TRAIN_KEYS)
        _warn_top_level_train_keys(opt)
    _warn_unread_keys(opt, 'val', VAL_KEYS)

    paths = opt['path']
    if not isinstance(paths, dict):
        raise OptionError(f'{opt_path}: path must be a mapping (pretrain_network_g, resume_state, ...)')
    resuming = bool(paths.get('resume_state')) or (is_train and args.auto_resume and _has_state(opt, args))
    for key, value in paths.items():
        if isinstance(value, str) and (key == 'resume_state' or (key.startswith('pretrain_network') and not resuming)):
            if not osp.isfile(osp.expanduser(value)):
                raise OptionError(f'file not found: {value} (path.{key} in {opt_path})')
    _check_path_keys(paths, opt_path)
    if not is_train and not isinstance(paths.get('pretrain_network_g'), str):
        raise OptionError(f'{opt_path}: path.pretrain_network_g is not set: basicsr test would test an untrained '
                          'network; give the checkpoint to test')
    if not resuming:
        _check_pretrained(opt, opt_path, is_train)
        if is_train:
            _check_not_in_archived_folder(opt, opt_path, args)
    if is_train:
        _check_wandb(opt, opt_path, args)

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


def _warn_shared_set_names(datasets: dict, opt_path: str) -> None:
    """BasicSR keys a validation/test set's saved images (visualization/<name>/), its log lines, its
    best metrics and its TensorBoard tags by the set's ``name``: two sets of one name mix them."""
    phases: dict = {}
    for phase, dataset in datasets.items():
        if not phase.startswith('train') and isinstance(dataset.get('name'), str):
            phases.setdefault(dataset['name'], []).append(phase)
    for name, same in phases.items():
        if len(same) > 1:
            print(f'warning: datasets.{" and datasets.".join(same)} in {opt_path} are both named {name!r}: '
                  'BasicSR saves their images into one folder (the last written kept) and logs and keeps their '
                  'metrics under one name; give each its own name', file=sys.stderr)


def _check_not_in_archived_folder(opt: dict, opt_path: str, args) -> None:
    """A new run renames an existing experiments/<name> to <name>_archived_<time> before it loads
    its networks: a pretrained file inside that folder is gone by then (FileNotFoundError)."""
    folder = osp.realpath(osp.join('experiments', _experiment_name(opt, args)))
    for key, value in opt['path'].items():
        if key.startswith('pretrain_network') and isinstance(value, str):
            if osp.realpath(osp.expanduser(value)).startswith(folder + os.sep):
                raise OptionError(f'path.{key} {value} lies in {osp.relpath(folder)}, which this run archives '
                                  f'(renames) before it loads it: copy the file out, or give the run another name '
                                  f'({opt_path})')


def _check_wandb(opt: dict, opt_path: str, args) -> None:
    """BasicSR starts wandb after it has archived the old run and made the new folders."""
    import importlib.util
    wandb = (opt.get('logger') or {}).get('wandb') or {}
    if not isinstance(wandb, dict) or wandb.get('project') is None or 'debug' in _experiment_name(opt, args):
        return
    if importlib.util.find_spec('wandb') is None:
        raise OptionError(f'logger.wandb.project is set but wandb is not installed (pip install wandb), in {opt_path}; '
                          'or remove logger.wandb')
    if opt['logger'].get('use_tb_logger') is not True:
        raise OptionError(f'logger.wandb needs logger.use_tb_logger: true (BasicSR syncs the tensorboard log to '
                          f'wandb), in {opt_path}')


def _experiment_name(opt: dict, args) -> str:
    name = opt['name']
    return 'debug_' + name if args.debug and not name.startswith('debug') else name


def _has_state(opt: dict, args) -> bool:
    return latest_training_state(osp.join('experiments', _experiment_name(opt, args), 'training_states')) is not None


# ------------------------------------------------------------------------------ BasicSR patches
_RUN = {'cuda': False, 'resumed': None}  # resumed: the (epoch, iter) of the state resumed from
_ORIGINAL = {}
_PATCHED: set = set()  # the patches that can also be applied on their own (in a loader worker)


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
    from basicsr.models.sr_model import SRModel
    from basicsr.utils import check_resume
    _RUN['resumed'] = None
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        candidates = [osp.join(state_dir, f'{it}.state') for it in reversed(saved_iterations(state_dir))]
    else:
        candidates = [opt['path']['resume_state']] if opt['path'].get('resume_state') else []
    if not candidates:
        return None
    device = torch.device('cuda', torch.cuda.current_device()) if opt['num_gpu'] != 0 else torch.device('cpu')
    ignored = opt['path'].get('ignore_resume_networks') or ()
    keys = [key for key in ('network_g', 'network_d') if key in opt and key not in ignored
            and (key == 'network_g' or _is_gan_model(opt.get('model_type')))]  # the networks the model reloads
    for index, path in enumerate(candidates):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            networks = {}
            for key in keys:
                net_path = osp.join(opt['path']['models'], f'net_{key[8:]}_{state["iter"]}.pth')
                if not osp.isfile(net_path):
                    raise FileNotFoundError(f'its network {net_path} is missing')
                networks[key] = net_path, pretrained_state_dict(net_path, 'params')[0]  # readable, not truncated
        except Exception as exc:
            if index + 1 == len(candidates) or not opt['auto_resume']:
                raise OptionError(f'cannot resume from {path}: {first_line(exc)}') from None
            print(f'Cannot resume from {path} ({exc}); trying {candidates[index + 1]}.', flush=True)
            continue
        for key, (net_path, network) in networks.items():
            _check_network_fits(opt[key], network, f'resume state {path} (its network {net_path})', key)
        optimizers = ('optim_g', 'optim_d')[:1 + _is_gan_model(opt.get('model_type'))]
        saved = len(state.get('optimizers') or ())
        if saved != len(optimizers) and _is_model_of(opt.get('model_type'), SRModel):  # they build these only
            raise OptionError(f'cannot resume from {path}: it holds the states of {saved} optimizer(s), but '
                              f'{opt["model_type"]} trains {len(optimizers)} ({", ".join(optimizers)}): it was saved '
                              'by another model; resume with the options of that run, or give this run another name')
        for number, key in enumerate(optimizers):
            _check_resumed_optimizer(opt, state, path, key, number)
        total = (opt.get('train') or {}).get('total_iter')
        if isinstance(total, (int, float)) and state['iter'] > total:  # BasicSR trained nothing, then saved
            raise OptionError(f'cannot resume from {path}: it is at iteration {state["iter"]}, past train.total_iter '
                              f'{total:g} (its net_g_latest.pth would be overwritten with the saved network); raise '
                              'total_iter to train on, or give this run another name')
        if isinstance(total, (int, float)) and state['iter'] == total and 'network_g' in networks:
            _check_latest_is_the_states(opt, path, state['iter'], networks['network_g'][1])
        opt['path']['resume_state'] = path
        check_resume(opt, state['iter'])
        _RUN['resumed'] = state['epoch'], state['iter']
        return state


def _check_latest_is_the_states(opt: dict, path: str, iteration: int, network: dict) -> None:
    """A state at ``total_iter`` trains nothing; BasicSR then saves its network as ``net_g_latest.pth``.
    That is harmless where the file holds that network (a run killed before its final save, or
    run again) but loses the network of a longer run that ended after this state (to 1500, states
    every 1000, then resumed with ``total_iter: 1000``)."""
    latest = osp.join(opt['path']['models'], 'net_g_latest.pth')
    if not osp.isfile(latest):
        return
    try:
        kept = pretrained_state_dict(latest, 'params')[0]
    except Exception:  # unreadable: BasicSR's save replaces it, as it would after training on
        return
    if kept.keys() == network.keys() and all(torch.equal(kept[k].cpu(), network[k].cpu()) for k in kept):
        return
    raise OptionError(f'cannot resume from {path}: it is at iteration {iteration}, train.total_iter, so nothing would '
                      f'be trained and {latest}, which holds another network (of a longer run?), would be overwritten '
                      'with the saved one; raise total_iter to train on, or give this run another name')


def _check_resumed_optimizer(opt: dict, state: dict, path: str, key: str = 'optim_g', number: int = 0) -> None:
    """The options' optimizer ``train.<key>`` must be the one the state saved as its ``number``-th
    (its settings are another optimizer's otherwise: a KeyError deep in torch); a changed learning
    rate is said to be ignored."""
    optim = (opt.get('train') or {}).get(key)
    saved = (state.get('optimizers') or [])[number:number + 1]
    saved = saved[0] if saved else None
    if not isinstance(optim, dict) or not isinstance(saved, dict) or not saved.get('param_groups'):
        return
    group = saved['param_groups'][0]
    try:
        fresh = _dummy_optimizer(opt.get('model_type', 'ESCSRModel'), optim)
    except Exception as exc:
        raise OptionError(f'cannot resume from {path}: train.{key} ({optim.get("type")}) cannot be built: '
                          f'{first_line(exc)}') from None
    # the optimizer's own settings; not the implementation flags newer torch versions add to every group
    expected = set(fresh.param_groups[0]) - {'params', 'foreach', 'maximize', 'capturable', 'differentiable',
                                             'fused', 'decoupled_weight_decay'}
    if not expected <= set(group):
        raise OptionError(f'cannot resume from {path}: it was saved with another optimizer than train.{key} '
                          f'{optim.get("type")} (its settings lack {", ".join(sorted(expected - set(group)))}); '
                          'resume with the options of that run, or give this run another name')
    # settings alike (Adamax's or Adam's are a subset of AdamW's): the per-parameter state tells
    saved_state = next(iter((saved.get('state') or {}).values()), None)
    if isinstance(saved_state, dict):
        fresh.param_groups[0]['params'][0].grad = torch.ones(1)
        fresh.step()
        wanted = set(next(iter(fresh.state.values()), {}))
        flags = [flag for flag in ('decoupled_weight_decay', 'amsgrad', 'nesterov')
                 if flag in group and flag in fresh.param_groups[0] and group[flag] != fresh.param_groups[0][flag]]
        if wanted != set(saved_state) or flags:
            detail = (f'{", ".join(flags)} differ' if flags else
                      f'its state holds {", ".join(sorted(saved_state))}, {optim.get("type")} keeps '
                      f'{", ".join(sorted(wanted))}')
            raise OptionError(f'cannot resume from {path}: it was saved with another optimizer than train.{key} '
                              f'{optim.get("type")} ({detail}); resume with the options of that run, or give this '
                              'run another name')
    base = group.get('initial_lr')
    if _is_number(base) and _is_number(optim.get('lr')) and not math.isclose(base, optim['lr']):
        print(f'Resuming from {path}: the learning rate follows the saved schedule (base lr {base:g}); '
              f'train.{key}.lr {optim["lr"]:g} is not used.', flush=True)


class ImageDecodeError(ValueError):
    """A training/validation image OpenCV cannot decode; the message names its file(s)."""


# BasicSR's image data sets, whose imfrombytes returns None (or fails on None.astype) for a corrupt file
_IMAGE_DATASETS = {'paired_image_dataset': 'PairedImageDataset', 'single_image_dataset': 'SingleImageDataset',
                   'realesrgan_dataset': 'RealESRGANDataset', 'realesrgan_paired_dataset': 'RealESRGANPairedDataset'}


def _as_png(img) -> bytes:
    """A decoded TIFF (1/8/16-bit or [0, 1] float; gray, gray + alpha, BGR, BGRA) as lossless PNG
    bytes for BasicSR's own decoder, which then converts it as it converts any image (its flag and
    float32). Other sample types (signed, 32-bit integers) are refused: PNG would saturate them."""
    import cv2
    import numpy as np

    from esc_arch.data.image_files import float_range_problem
    from esc_arch.inference import FLOAT_SLACK
    if img.dtype == np.bool_:  # bilevel: white is 1 (cv2.imencode would store it as 1 of 255)
        img = img.astype(np.uint8) * 255
    elif img.dtype.kind == 'f':
        img = img.astype(np.float32)  # float16's 65535 would overflow
        if problem := float_range_problem(img, FLOAT_SLACK):
            raise ImageDecodeError(f'its float pixels {problem}; BasicSR takes [0, 1] (store it as 8/16-bit)')
        img = np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)
    elif img.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(f'its {img.dtype} samples are not an image type BasicSR reads (8/16-bit or float)')
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha: OpenCV reads such a PNG as BGRA
        img = img[:, :, [0, 0, 0, 1]]
    ok, png = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    if not ok:
        raise ImageDecodeError(f'cannot convert its {img.dtype} {img.shape} pixels')
    return png.tobytes()


def _checked_imfrombytes(original):
    import cv2

    from esc_arch.data.image_files import TIFF_MAGIC
    from esc_arch.inference import MissingCodecError, read_tiff_bytes

    def imfrombytes(content, *args, **kwargs):
        if bytes(content[:4]) in TIFF_MAGIC:  # OpenCV reads some TIFFs as wrong pixels, with no error
            try:
                img = read_tiff_bytes(content)
            except MissingCodecError as exc:  # the data set names the files
                raise ImageDecodeError(exc.reason) from None
            if img is not None:
                content = _as_png(img)
        try:
            img = original(content, *args, **kwargs)
        except (AttributeError, cv2.error):  # None.astype: OpenCV decoded nothing; an empty file
            img = None
        if img is None:
            raise ImageDecodeError('OpenCV cannot decode it (corrupt or truncated?)')
        return img

    return imfrombytes


_READ_TRIES = 3


def _retried_reads(get):
    """``FileClient.get`` of the image data sets: a file that cannot be read (gone since the checks
    before the run, no permission, a network file system's hiccup) is tried again, 1 s apart, then
    is an ImageDecodeError the data set names. BasicSR failed with a traceback, except in
    RealESRGANDataset, which on a read error reads another file at random, ``randint(0, len)``:
    the image list's length itself one time in len + 1 (an IndexError), and after three failures
    ``UnboundLocalError: img_bytes``."""
    if getattr(get, 'retried', False):
        return get

    @functools.wraps(get)
    def wrapper(self, filepath, *args, **kwargs):
        import time
        for attempt in range(1, _READ_TRIES + 1):
            try:
                return get(self, filepath, *args, **kwargs)
            except OSError as exc:
                if attempt == _READ_TRIES:
                    reason = exc.strerror or first_line(exc)
                    raise ImageDecodeError(f'{reason} (tried {_READ_TRIES} times, 1 s apart)') from None
                time.sleep(1)
    wrapper.retried = True
    return wrapper


def _named_decode_errors(getitem):
    def __getitem__(self, index):
        try:
            return getitem(self, index)
        except ImageDecodeError as exc:
            entry = self.paths[index % len(self.paths)] if getattr(self, 'paths', None) else None
            names = ', '.join(map(str, entry.values())) if isinstance(entry, dict) else str(entry)
            raise ImageDecodeError(f'cannot read an image of {names}: {exc}') from None

    return __getitem__


def _decode_error_line(exc: ImageDecodeError) -> str:
    """The message, also when a data loader worker re-raised it with its traceback in front."""
    lines = [line.strip() for line in str(exc).splitlines() if 'cannot read an image of' in line]
    line = lines[-1] if lines else str(exc).strip().splitlines()[-1]
    return line.split('ImageDecodeError: ')[-1]


def _dataloader_wrapper(original):
    """BasicSR counts an epoch as ceil(samples / batch) iterations, but its training loader drops
    the last partial batch, so a small data set ran out of epochs before total_iter: the epoch
    count is redone from the loader's real length. Its workers get the data sets' patches."""

    def create_train_val_dataloader(opt, logger):
        train_loader, train_sampler, val_loaders, total_epochs, total_iters = original(opt, logger)
        if train_loader is not None and train_loader.num_workers > 0:
            train_loader.worker_init_fn = _WorkerInit(train_loader.worker_init_fn)
        if train_sampler is not None:
            _stopping.STOP.follow_epochs(train_sampler)
        if train_loader is not None and len(train_loader) > 0:
            # a resumed run goes on from the saved epoch, which another batch size (or data set) counted
            epoch, done = _RUN['resumed'] or (0, 0)
            total_epochs = max(total_epochs, epoch + math.ceil((total_iters - done) / len(train_loader)))
        return train_loader, train_sampler, val_loaders, total_epochs, total_iters

    return create_train_val_dataloader


def _parse_options_wrapper(original):

    def parse_options(root_path, is_train=True):
        opt, args = original(root_path, is_train)
        for keys, number in signed_whole_numbers(args.force_yml):  # BasicSR applied them as floats
            node = opt
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = number
        if any(entry.partition('=')[0].strip() == 'manual_seed' for entry in args.force_yml or ()):
            # BasicSR seeds before it applies --force_yml: seed with the forced value
            from basicsr.utils import set_random_seed
            set_random_seed(opt['manual_seed'] + opt.get('rank', 0))
        launched = args.launcher != 'none'
        if opt['dist'] != launched:  # set by --force_yml after BasicSR set it from --launcher
            print(f'dist is set by --launcher ({args.launcher}): ignoring dist={opt["dist"]}', flush=True)
            opt['dist'] = launched
        train_set = opt['datasets'].get('train') or {}
        if launched and train_set.get('num_worker_per_gpu') and train_set.get('prefetch_mode') != 'cpu':
            # DDP makes BasicSR spawn its loader workers (each imports torch, BasicSR and the archs
            # afresh): keep them across epochs instead of starting them anew every epoch (not with
            # the cpu prefetcher, whose thread would share the reused iterator with the next epoch's)
            train_set.setdefault('persistent_workers', True)
        if opt['num_gpu'] == 0:
            for dataset in opt['datasets'].values():
                if dataset.get('prefetch_mode') == 'cuda':
                    dataset['prefetch_mode'] = None
                    print(f'{dataset.get("name")}: prefetch_mode cuda needs a GPU; using the plain loader.', flush=True)
                dataset['pin_memory'] = False
        if not is_train:
            if not isinstance(opt.get('val'), dict):  # none, or an empty `val:` (None)
                opt['val'] = OrderedDict(save_img=True)
            opt['val'].setdefault('suffix', None)
            opt['val'].setdefault('save_img', True)
        return opt, args

    return parse_options


_REAL_MODELS = ('realesrnet_model', 'realesrgan_model')


def _stays_on_cpu_run(module_class):
    """``module_class`` whose ``.cuda()`` does nothing in a CPU run (BasicSR's Real-ESRNet/GAN models
    move their DiffJPEG and USMSharp there unconditionally), with a contiguous output there: DiffJPEG
    returns a channels-last view, which PyTorch's CPU reflection pad keeps (CUDA's does not), and
    BasicSR's ``filter2D`` then cannot ``view`` it."""
    class OnRunDevice(module_class):
        def cuda(self, device=None):
            return super().cuda(device) if _RUN['cuda'] else self

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            return out if _RUN['cuda'] else out.contiguous()

    OnRunDevice.__name__ = OnRunDevice.__qualname__ = module_class.__name__
    return OnRunDevice


def _queue_on_batch_device(dequeue_and_enqueue):
    """The Real models' pair queue, made on the batch's device (BasicSR makes it with ``.cuda()``),
    with a clear error for a ``queue_size`` the batch size does not divide."""
    def wrapper(self):
        if not hasattr(self, 'queue_lr'):
            batch = self.lq.size(0)
            if self.queue_size % batch:
                raise OptionError(f'queue_size ({self.queue_size}) must be a multiple of the batch size per '
                                  f'process ({batch})')
            self.queue_lr = self.lq.new_zeros((self.queue_size, *self.lq.shape[1:]))
            self.queue_gt = self.gt.new_zeros((self.queue_size, *self.gt.shape[1:]))
            self.queue_ptr = 0
        return dequeue_and_enqueue(self)
    return wrapper


def _named_weight_downloads(init):
    """VGGFeatureExtractor's ``__init__``, with a failed download of torchvision's ImageNet weights
    (an offline machine) as an OptionError naming the file and where it is looked for."""
    import inspect
    import urllib.error
    signature = inspect.signature(init)

    def wrapper(self, *args, **kwargs):
        try:
            return init(self, *args, **kwargs)
        except urllib.error.URLError as exc:
            import torchvision
            from basicsr.archs import vgg_arch
            vgg_type = signature.bind(self, *args, **kwargs).arguments.get('vgg_type', 'vgg19')
            url = torchvision.models.get_model_weights(vgg_type).IMAGENET1K_V1.url
            cache = osp.join(torch.hub.get_dir(), 'checkpoints')
            raise OptionError(f'the perceptual loss needs the ImageNet {vgg_type} weights and downloading them failed '
                              f'({getattr(exc, "reason", exc)}): put {url.rsplit("/", 1)[1]} from {url} in {cache}'
                              + (f' (or at {vgg_arch.VGG_PRETRAIN_PATH})' if vgg_type == 'vgg19' else '')) from None
    return wrapper


def _patch_image_datasets() -> None:
    """The image data sets' decode-error patches (idempotent; also run in each loader worker)."""
    if 'datasets' in _PATCHED:
        return
    import importlib
    _PATCHED.add('datasets')
    from basicsr.utils.file_client import FileClient
    FileClient.get = _retried_reads(FileClient.get)
    for module_name, class_name in _IMAGE_DATASETS.items():
        module = importlib.import_module(f'basicsr.data.{module_name}')
        module.imfrombytes = _checked_imfrombytes(module.imfrombytes)
        dataset = getattr(module, class_name)
        dataset.__getitem__ = _named_decode_errors(dataset.__getitem__)


class _WorkerInit:
    """A training loader worker's start: the data sets' patches, then seeding. Under DDP BasicSR
    starts workers by spawning, and a spawned worker imports BasicSR afresh, without the patches.

    BasicSR seeds ``random`` and NumPy (the crops and flips) with seed + worker + rank, the same
    every epoch, and its loader starts new workers every epoch (unless ``persistent_workers``): each
    epoch would draw the same crop positions and flips again. The seed is PyTorch's for the worker
    instead (a base drawn from the main process's generator for each epoch's workers, + the
    worker's index), so it differs between epochs, workers and DDP processes (seeded seed + rank)
    and is still fixed by ``manual_seed``."""

    def __init__(self, seeding):
        self.seeding = seeding

    def __call__(self, worker_id):
        _patch_image_datasets()
        _stopping.ignore_ctrl_c()
        if self.seeding is not None:  # BasicSR's, given a manual_seed: ours replaces it
            import random

            import numpy as np
            seed = torch.initial_seed()
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)


def _shared_lmdb_environments(init):
    """BasicSR's LmdbBackend opens its own environment per data set; LMDB refuses a second open of a
    path in one process, and in a worker forked from it (the parent's is inherited: that one is read
    there). Read-only opens of a path share one environment (``data.lmdb_envs.shared_lmdb``); others are
    BasicSR's own."""
    @functools.wraps(init)
    def wrapper(self, db_paths, client_keys='default', readonly=True, lock=False, readahead=False, **kwargs):
        paths = [db_paths] if isinstance(db_paths, (str, os.PathLike)) else list(db_paths)
        keys = [client_keys] if isinstance(client_keys, str) else list(client_keys)
        if not readonly or len(paths) != len(keys):
            return init(self, db_paths, client_keys, readonly, lock, readahead, **kwargs)
        self.db_paths = [str(path) for path in paths]
        self._client = {key: shared_lmdb(path, lock=lock, readahead=readahead, **kwargs)
                        for key, path in zip(keys, self.db_paths)}
    return wrapper


def _eta_of_the_iterations_left(message_logger):
    """BasicSR's training log estimates the time left from ``total_iter - iter - 1`` iterations, one
    too few: the last line said 'eta: -1 day, 23:59:59'."""
    class MessageLogger(message_logger):
        def __init__(self, opt, *args, **kwargs):
            super().__init__(opt, *args, **kwargs)
            self.max_iters += 1

    return MessageLogger


def _followed_model(build_model):
    """BasicSR's training loop stops when its counter passes ``total_iter`` and then validates with
    that counter: the last validation would be labelled ``total_iter + 1``. The model is also
    followed for a stop on Ctrl-C or SIGTERM (``_stopping``)."""
    @functools.wraps(build_model)
    def wrapper(opt):
        model = build_model(opt)
        total = (opt.get('train') or {}).get('total_iter')
        validation = model.validation

        @functools.wraps(validation)
        def within_total(dataloader, current_iter, *args, **kwargs):
            if isinstance(total, (int, float)) and isinstance(current_iter, int) and current_iter > total:
                current_iter = int(total)
            return validation(dataloader, current_iter, *args, **kwargs)
        model.validation = within_total
        if opt.get('is_train'):
            _stopping.STOP.watch(model, (_RUN['resumed'] or (None, None))[1])
        return model
    return wrapper


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
        basicsr.train.create_train_val_dataloader = _dataloader_wrapper(basicsr.train.create_train_val_dataloader)
        basicsr.train.build_model = _followed_model(basicsr.train.build_model)
        basicsr.train.MessageLogger = _eta_of_the_iterations_left(basicsr.train.MessageLogger)
        from basicsr.models.base_model import BaseModel
        BaseModel.load_network = ESCSRModel.load_network
        from basicsr.utils import file_client
        file_client.LmdbBackend.__init__ = _shared_lmdb_environments(file_client.LmdbBackend.__init__)
        _patch_image_datasets()
        import importlib
        for module_name in _REAL_MODELS:
            module = importlib.import_module(f'basicsr.models.{module_name}')
            module.DiffJPEG, module.USMSharp = _stays_on_cpu_run(module.DiffJPEG), _stays_on_cpu_run(module.USMSharp)
            for model in vars(module).values():
                if isinstance(model, type) and '_dequeue_and_enqueue' in vars(model):
                    model._dequeue_and_enqueue = _queue_on_batch_device(model._dequeue_and_enqueue)
        from basicsr.archs import vgg_arch
        vgg_arch.VGGFeatureExtractor.__init__ = _named_weight_downloads(vgg_arch.VGGFeatureExtractor.__init__)
        basicsr.train.parse_options = _parse_options_wrapper(basicsr.train.parse_options)
        basicsr.test.parse_options = _parse_options_wrapper(basicsr.test.parse_options)


def _quiet_suffixed_get(get):
    """BasicSR registers some names with a suffix (``UNetDiscriminatorSN_basicsr``, so that
    Real-ESRGAN's own can sit beside it) and prints 'Name UNetDiscriminatorSN is not found, use
    name: UNetDiscriminatorSN_basicsr!' every time an option file names it plainly: the same
    lookup, without the alarming line."""
    if getattr(get, 'quiet_suffixed', False):
        return get

    @functools.wraps(get)
    def wrapper(self, name, suffix='basicsr'):
        if name not in self._obj_map and f'{name}_{suffix}' in self._obj_map:
            return self._obj_map[f'{name}_{suffix}']
        return get(self, name, suffix)
    wrapper.quiet_suffixed = True
    return wrapper


# ------------------------------------------------------------------------------ running
def _peer_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure because another DDP process went away (gloo's
    'Connection closed by peer'), i.e. the consequence of that process's error, not a cause."""
    text = str(exc)
    return any(words in text for words in ('Connection closed by peer', 'Connection reset by peer'))


def _say_error(command: str, problem) -> None:
    """One error line in one write: under torchrun every process shares the terminal, and ``print``
    writes the text and its newline separately (stderr is unbuffered), so lines could interleave."""
    sys.stderr.write(f'basicsr {command}: error: {problem}\n')
    sys.stderr.flush()


def run(command: str, args) -> int:
    """Check the options, then run BasicSR's pipeline for ``command`` ('train' or 'test')."""
    import torch.distributed as dist
    is_train = command == 'train'
    try:
        import_arch_modules(getattr(args, 'imports', None))
    except PluginImportError as exc:
        _say_error(command, exc)
        return 2
    from basicsr.utils.registry import Registry
    Registry.get = _quiet_suffixed_get(Registry.get)  # before the checks, which look the archs up too
    try:
        opt = load_options(args.opt, args.force_yml)
        from esc_arch.data.demo import ensure_demo_data_for_options
        ensure_demo_data_for_options(opt)  # the embedded demo set is built on first use (idempotent)
        check_options(opt, args.opt, is_train, args)
    except OptionError as exc:
        _say_error(command, exc)
        return 2
    except OSError as exc:  # building the demo data set: a read-only folder, a full disk
        _say_error(command, environment_problem(exc))
        return 1
    patch_basicsr(use_cuda=resolve_num_gpu(opt) > 0)

    argv = [f'basicsr {command}', '-opt', args.opt, '--launcher', args.launcher, '--local_rank', str(args.local_rank)]
    argv += ['--auto_resume'] * args.auto_resume + ['--debug'] * args.debug
    if args.force_yml:
        argv += ['--force_yml', *normalize_force_yml(args.force_yml)]
    saved_argv, sys.argv = sys.argv, argv
    try:
        if is_train:
            import basicsr.train
            try:
                with _stopping.STOP.handling():
                    basicsr.train.train_pipeline(os.getcwd())
            except BaseException:
                _stopping.sigterm_ends_the_process()
                raise
        else:
            import basicsr.test
            basicsr.test.test_pipeline(os.getcwd())
    except _stopping.TrainingInterrupted as exc:  # Ctrl-C or SIGTERM, the last iteration saved
        return exc.report(command)
    except TrainingStoppedError as exc:  # diverged, or the final network not saved
        if not dist.is_initialized() or dist.get_rank() == 0:
            from basicsr.utils import get_root_logger
            get_root_logger().error(str(exc))
        return 1
    except OptionError as exc:  # found once BasicSR has the experiment set up (e.g. a state to resume)
        _say_error(command, exc)
        return 2
    except ImageDecodeError as exc:
        _say_error(command, _decode_error_line(exc))
        return 1
    except RuntimeError as exc:
        # asked to stop, then a failure: the loader's workers got the SIGTERM too, or a DDP peer is gone
        stopped = _stopping.STOP.after_failure(exc) if is_train and _stopping.STOP.requested is not None else None
        if dist.is_initialized() and _peer_stopped(exc):
            saved = (f'; iteration {stopped.saved} is saved (add --auto_resume to go on from it)'
                     if stopped is not None and stopped.saved is not None and _stopping.first_process() else '')
            _say_error(command, f'process {dist.get_rank()} of {dist.get_world_size()} stops: another one stopped '
                                f'(its error is above){saved}')
            return 1
        if stopped is not None:
            return stopped.report(command)
        problem = environment_problem(exc)
        if problem is None:
            raise
        _say_error(command, problem)
        return 1
    except (OSError, MemoryError) as exc:  # e.g. a read-only folder for experiments/, a name too long
        _say_error(command, environment_problem(exc))
        return 1
    finally:
        sys.argv = saved_argv
        _stopping.STOP.uninstall()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
