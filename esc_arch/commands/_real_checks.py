"""The real-world models' degradation options (Real-ESRNet / Real-ESRGAN and the ESC-Real models
built on them), checked before the run.

BasicSR reads them with ``opt[key]`` where they are used: the model's in its first ``feed_data``
(after set-up, with ``experiments/<name>`` made), ``RealESRGANDataset``'s in a loader worker. A
missing one is a ``KeyError``, and a range given as a number, a probability list of the wrong
length or an unknown kernel name is a ``TypeError``, ``ValueError``, ``IndexError`` or
``UnboundLocalError`` from deep inside the degradation code. Here each is one line naming the key.
"""
from __future__ import annotations

import difflib

from ..messages import OptionError
from ._data_checks import is_whole, require_keys

CROP_PAD_SIZE = 400  # RealESRGANDataset crops (or pads) every GT image to 400x400: a constant in BasicSR

# what the second-order degradation reads from the top level of the options (both models)
PROBABILITIES = ('gaussian_noise_prob', 'gray_noise_prob', 'second_blur_prob', 'gaussian_noise_prob2',
                 'gray_noise_prob2')
# the bounds of each [low, high] range the model draws from: (lowest, whether lowest itself is
# allowed, highest, which the draws must stay below); a resize by 0 fails, no noise is fine, a JPEG
# quality of 0 fails and one of 100 makes DiffJPEG divide by 0 (a nan LQ image)
RANGES = {'resize_range': (0, False, None), 'noise_range': (0, True, None), 'poisson_scale_range': (0, True, None),
          'jpeg_range': (0, False, 100), 'resize_range2': (0, False, None), 'noise_range2': (0, True, None),
          'poisson_scale_range2': (0, True, None), 'jpeg_range2': (0, False, 100)}
WEIGHTS = {'resize_prob': 3, 'resize_prob2': 3}  # weights of up / down / keep
MODEL_KEYS = ('gt_size', *WEIGHTS, *RANGES, *PROBABILITIES)
# the switches each model tests: Real-ESRNet's with `is True`, Real-ESRGAN's with `is False`
ESRNET_SWITCHES = ('gt_usm', )
ESRGAN_SWITCHES = ('l1_gt_usm', 'percep_gt_usm', 'gan_gt_usm')
# RealESRGANDataset gives GT images and the blur kernels the model degrades them with; BasicSR's
# other data sets give no kernels (the model's high-order degradation would fail on 'kernel1')
KERNEL_DATASETS = ('RealESRGANDataset', )

KERNELS = ('iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso')


def real_model_kind(model_type) -> str | None:
    """'esrnet' or 'esrgan' for a model of BasicSR's real-world family (its own or one built on it)."""
    from basicsr.models.realesrgan_model import RealESRGANModel
    from basicsr.models.realesrnet_model import RealESRNetModel
    from basicsr.utils.registry import MODEL_REGISTRY
    try:
        model = MODEL_REGISTRY.get(model_type)
    except (KeyError, TypeError):
        return None
    if not isinstance(model, type):
        return None
    return 'esrgan' if issubclass(model, RealESRGANModel) else 'esrnet' if issubclass(model, RealESRNetModel) else None


def _gives_no_kernels(dataset_type) -> bool:
    """Whether ``dataset_type`` is one of BasicSR's data sets that give no blur kernels (a data set
    of another package may give them: it is not judged)."""
    from basicsr.utils.registry import DATASET_REGISTRY
    try:
        dataset = DATASET_REGISTRY.get(dataset_type)
    except (KeyError, TypeError):
        return False
    return dataset_type not in KERNEL_DATASETS and getattr(dataset, '__module__', '').startswith('basicsr.')


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(key: str, value, where: str) -> None:
    if not (_number(value) and 0 <= value <= 1):
        raise OptionError(f'{key} must be a probability from 0 to 1, got {value!r} ({where})')


def _check_range(key: str, value, where: str, lowest=None, inclusive=False, highest=None, strict=False) -> None:
    """A [low, high] list of two numbers within the bounds (low < high if ``strict``). BasicSR draws
    from [low, high): ``highest`` is never drawn from a range up to it, but always from [highest, highest]."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value)):
        raise OptionError(f'{key} must be a [low, high] list of two numbers, got {value!r} ({where})')
    low, high = value
    if low > high or (strict and low == high):
        raise OptionError(f'{key} must have low {"<" if strict else "<="} high, got {value!r} ({where})')
    if lowest is not None and (low < lowest or (low == lowest and not inclusive)):
        bound = f'at least {lowest}' if inclusive else f'above {lowest}'
        raise OptionError(f'{key} must be {bound}, got {value!r} ({where})')
    if highest is not None and high > highest:
        raise OptionError(f'{key} must be at most {highest}, got {value!r} ({where})')
    if highest is not None and low == highest:
        raise OptionError(f'{key} must have low below {highest}, got {value!r} ({where}; BasicSR draws from '
                          f'[low, high), so it would draw {highest} itself, which fails)')


def _check_weights(key: str, value, count: int, where: str, names=None) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == count and all(_number(v) and v >= 0 for v in value)
            and sum(value) > 0):
        of = f' ({", ".join(names)})' if names else ''
        raise OptionError(f'{key} must be a list of {count} weights >= 0, not all 0, one per choice{of}; '
                          f'got {value!r} ({where})')


def _check_switches(opt: dict, keys, tested_with: bool, where: str) -> None:
    """Switches BasicSR tests with ``is tested_with``: any other value counts as ``not tested_with``."""
    for key in keys:
        value = opt.get(key)
        if not isinstance(value, bool):
            raise OptionError(f'{key} must be true or false, got {value!r} ({where}; BasicSR tests it with '
                              f'"is {tested_with}", so {value!r} would be taken as {str(not tested_with).lower()})')


def check_real_model_options(opt: dict, opt_path: str) -> None:
    """The top-level options a real-world model's training reads, when ``opt`` trains one."""
    kind = real_model_kind(opt.get('model_type'))
    if kind is None:
        return
    where = f'the top level of {opt_path}'
    train_set = (opt.get('datasets') or {}).get('train') or {}
    if kind == 'esrgan':
        require_keys(ESRGAN_SWITCHES, opt, opt['model_type'], where)
        _check_switches(opt, ESRGAN_SWITCHES, False, where)
    switch = opt.get('high_order_degradation', True)
    if not isinstance(switch, bool):  # BasicSR tests its truth: a quoted 'false' would degrade
        raise OptionError(f'high_order_degradation must be true or false, got {switch!r} ({where}; BasicSR '
                          f'tests its truth, so {switch!r} would be taken as {str(bool(switch)).lower()})')
    if not switch:  # trains on the data set's own LQ images
        if train_set.get('type') == 'RealESRGANDataset':
            raise OptionError(f'high_order_degradation is false, so {opt["model_type"]} trains on the data set\'s '
                              'own LQ images, but RealESRGANDataset gives GT images only: use a paired data set '
                              f'(e.g. RealESRGANPairedDataset) or high_order_degradation: true ({opt_path})')
        return
    if _gives_no_kernels(train_set.get('type')):
        raise OptionError(f'{opt["model_type"]} degrades its GT images on the fly (high_order_degradation is true, '
                          f'the default) with the blur kernels RealESRGANDataset gives, but datasets.train is '
                          f'{train_set["type"]}: use RealESRGANDataset, or set high_order_degradation: false to '
                          f'train on the data set\'s own LQ images ({opt_path})')
    require_keys(MODEL_KEYS + ESRNET_SWITCHES * (kind == 'esrnet'), opt, f'{opt["model_type"]}\'s degradation', where)
    if kind == 'esrnet':
        _check_switches(opt, ESRNET_SWITCHES, True, where)
    for key in PROBABILITIES:
        _check_probability(key, opt[key], where)
    for key, (lowest, inclusive, highest) in RANGES.items():
        _check_range(key, opt[key], where, lowest, inclusive, highest)
    for key, count in WEIGHTS.items():
        _check_weights(key, opt[key], count, where, names=('up', 'down', 'keep'))
    scale, patch = opt.get('scale'), opt['gt_size']
    if is_whole(scale, 1) and CROP_PAD_SIZE % scale and train_set.get('type') == 'RealESRGANDataset':
        raise OptionError(f'scale {scale} does not divide {CROP_PAD_SIZE}, the GT crop RealESRGANDataset makes: '
                          f'its LQ would not be x{scale} of it (BasicSR: "Scale mismatches") ({opt_path})')
    if not is_whole(patch, 1):
        raise OptionError(f'gt_size must be a whole number of pixels, got {patch!r} ({where})')
    if is_whole(scale, 1) and patch % scale:
        raise OptionError(f'gt_size {patch} is not a multiple of scale {scale}: its LQ patch would be '
                          f'{patch / scale:g} pixels ({where})')
    if patch > CROP_PAD_SIZE and train_set.get('type') == 'RealESRGANDataset':
        raise OptionError(f'gt_size {patch} is larger than the {CROP_PAD_SIZE}x{CROP_PAD_SIZE} GT crop '
                          f'RealESRGANDataset makes of every image ({where})')
    queue, batch = opt.get('queue_size', 180), train_set.get('batch_size_per_gpu')
    if not is_whole(queue, 1):
        raise OptionError(f'queue_size must be a whole number >= 1, got {queue!r} ({where})')
    if is_whole(batch, 1) and queue % batch:
        raise OptionError(f'queue_size ({queue}) must be a multiple of the batch size per process ({batch}) '
                          f'({where})')


def check_real_dataset_options(dataset: dict, where: str) -> None:
    """RealESRGANDataset's kernel options, for a training set of that type (after check_required_keys)."""
    for order in ('', '2'):
        kernels = dataset[f'kernel_list{order}']
        if not (isinstance(kernels, (list, tuple)) and kernels and all(isinstance(k, str) for k in kernels)):
            raise OptionError(f'kernel_list{order} must be a list of kernel names ({", ".join(KERNELS)}), '
                              f'got {kernels!r} ({where})')
        unknown = [k for k in kernels if k not in KERNELS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], KERNELS, n=1)
            hint = f' (did you mean {close[0]}?)' if close else ''
            raise OptionError(f'kernel_list{order}: unknown kernel {unknown[0]!r}{hint}; BasicSR has '
                              f'{", ".join(KERNELS)} ({where})')
        _check_weights(f'kernel_prob{order}', dataset[f'kernel_prob{order}'], len(kernels), where,
                       names=[str(k) for k in kernels])
        # a sigma of exactly 0 would divide by 0, but [0, high) is drawn from: 0 itself all but never
        _check_range(f'blur_sigma{order}', dataset[f'blur_sigma{order}'], where, lowest=0, inclusive=True,
                     strict=True)
        for key in (f'betag_range{order}', f'betap_range{order}'):
            _check_range(key, dataset[key], where, lowest=0)
        _check_probability(f'sinc_prob{order}', dataset[f'sinc_prob{order}'], where)
    _check_probability('final_sinc_prob', dataset['final_sinc_prob'], where)
