"""Measure parameters, FLOPs, latency and peak memory of any arch in BasicSR's ``ARCH_REGISTRY``.

Every (arch, setting) measurement runs in a fresh child process (``python -m esc_arch.benchmark
--worker IN.json OUT.json``) so that its CPU peak memory is not polluted by earlier models.

Method, as written into every record:

* **params**: ``sum(p.numel() for p in model.parameters())``.
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, one
  multiply-add = 2 FLOPs; ``macs`` = flops / 2, the unit many SR papers call "FLOPs") on a copy
  of the model moved to the ``meta`` device, so the exact count at full size costs no compute.
  FlopCounterMode has no formula for the CPU kernel of
  ``scaled_dot_product_attention``, so models with ``set_attn_type`` (the ESC family) are counted
  on a copy switched to the ``'naive'`` backend (identical maths, explicit matmuls); any attention
  op that still went uncounted is listed in ``flops_uncounted_ops``.
* **latency**: ``warmup`` untimed runs, then ``runs`` timed forward passes under
  ``torch.inference_mode()`` (``torch.cuda.synchronize()`` around each on CUDA); median/min/max.
* **peak memory**: CUDA: ``torch.cuda.max_memory_allocated()`` over the timed runs (weights
  included). CPU: peak resident set size of the child (``getrusage(RUSAGE_SELF).ru_maxrss``, the
  same number as ``VmHWM``) after the runs, minus ``VmRSS`` read right before the first forward,
  i.e. after imports, model construction and input creation. ``VmHWM`` cannot be reset, so the
  record also keeps ``VmHWM`` before the first forward; if the forward passes never exceeded it
  (``memory_exceeded_baseline_hwm`` false) the number is only an upper bound.
* **--check**: max abs difference between the output and the same model (undeployed) in float64
  on the same input. Done after the memory reading so it does not affect it.

Inputs are padded (reflect, bottom/right) to a multiple of the arch's ``window_size`` when it has
one, for every arch alike (``--no-pad`` turns this off for archs that pad themselves, like ESC);
``input_size`` in the record is the padded size, ``pad`` whether padding was on.
"""
from __future__ import annotations

import collections
import copy
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import yaml

from .arch_options import options_problem
from .fileio import atomic_path, atomic_write_bytes
from .messages import first_line

DEFAULT_OUTPUT_SIZE = (720, 1280)  # H, W of the SR output the default LR size is derived from
DTYPES = ('fp32', 'bf16', 'fp16')

# Released ESC configs (ESC_SPEC.md) and the usual comparison set; the scale key is filled in.
PRESETS = {
    'esc': ('ESC', dict(dim=64, pdim=16, kernel_size=13, n_blocks=5, conv_blocks=5, window_size=32, num_heads=4,
                        exp_ratio=1.25)),
    'esc-light': ('ESC', dict(dim=64, pdim=16, kernel_size=13, n_blocks=3, conv_blocks=5, window_size=32,
                              num_heads=4, exp_ratio=1.25)),
    'esc-fp': ('ESCFP', dict(dim=48, pdim=16, kernel_size=13, n_blocks=5, conv_blocks=5, window_size=32,
                             num_heads=3, exp_ratio=1.25)),
    'esc-xl': ('ESC', dict(dim=192, pdim=48, kernel_size=13, n_blocks=8, conv_blocks=5, window_size=48,
                           num_heads=12, exp_ratio=1.25, use_ln=True)),
    'esc-real': ('ESCReal', dict(dim=64, pdim=16, kernel_size=13, n_blocks=10, conv_blocks=5, window_size=32,
                                 num_heads=4, exp_ratio=2)),
    'esc-fb': ('ESC', dict(dim=64, pdim=16, kernel_size=13, n_blocks=5, conv_blocks=5, window_size=32, num_heads=4,
                           exp_ratio=1.25, attn_type='FlashBias', flashbias_rank=48)),  # the authors' ESC_FB_R48
    'swinir-light': ('SwinIR', dict(img_size=64, window_size=8, img_range=1., depths=[6, 6, 6, 6], embed_dim=60,
                                    num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler='pixelshuffledirect')),
    'edsr-baseline': ('EDSR', dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, res_scale=1,
                                   img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])),
    'rcan': ('RCAN', dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_group=10, num_block=20, squeeze_factor=16,
                          res_scale=1, img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])),
}
PRESET_SCALE_KEY = {'ESC': 'upscaling_factor', 'ESCFP': 'upscaling_factor', 'ESCReal': 'upscaling_factor',
                    'SwinIR': 'upscale', 'EDSR': 'upscale', 'RCAN': 'upscale'}
PRESET_FIXED_SCALE = {'esc-real': 4}


class BenchError(ValueError):
    """A user error (bad arch, option, size or device); its message is shown as one line."""


# --------------------------------------------------------------------------------------
# arch specs
# --------------------------------------------------------------------------------------
def _split_top_level(text: str, sep: str = ',') -> list[str]:
    """Split on ``sep`` outside brackets, so ``depths=[6,6],dim=4`` gives two items."""
    parts, depth, current = [], 0, ''
    for char in text:
        depth += char in '[({'
        depth -= char in '])}'
        if char == sep and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


class _ValueLoader(yaml.SafeLoader):
    """YAML values as ``basicsr train`` reads them (``1e-1`` is a number, not a string)."""


def parse_options(text: str) -> dict:
    """``'dim=64,depths=[6,6],use_ln=true'`` -> dict; values are parsed as YAML scalars/lists."""
    from .commands._pipeline import read_exponent_floats
    read_exponent_floats(_ValueLoader)
    options = {}
    for item in _split_top_level(text):
        key, eq, value = item.partition('=')
        if not eq or not key.strip().isidentifier():
            raise BenchError(f'bad option {item!r}: expected key=value (e.g. dim=64)')
        if not value.strip():  # YAML reads it as None, which no size or count takes
            raise BenchError(f'bad option {item!r}: no value after = (write null for None)')
        try:
            options[key.strip()] = yaml.load(value, Loader=_ValueLoader)
        except yaml.YAMLError as err:
            raise BenchError(f'bad value in option {item!r}: {getattr(err, "problem", None) or first_line(err)}') \
                from None
    return options


def registered_archs() -> list[str]:
    # importing this module ran esc_arch/__init__ (compat shim, our archs) before basicsr
    import basicsr.archs  # noqa: F401  (imports every basicsr arch module, filling the registry)
    from basicsr.utils.registry import ARCH_REGISTRY
    return sorted(ARCH_REGISTRY.keys())


def registered_name(name: str) -> str:
    """The registry's key for ``name``: itself, or as BasicSR registered some of its archs, with a
    ``_basicsr`` suffix (``SRVGGNetCompact``), which its option files leave out."""
    names = registered_archs()
    if name in names:
        return name
    if f'{name}_basicsr' in names:
        return f'{name}_basicsr'
    raise BenchError(f"unknown arch {name!r}; registered archs: {', '.join(names)}")


def arch_spec(text: str) -> dict:
    """``'ESC:dim=64,...'`` (``--arch``) -> spec dict."""
    name, _, opts = text.partition(':')
    name = name.strip()
    return {'label': name, 'type': registered_name(name), 'options': parse_options(opts), 'source': f'--arch {text}',
            'variant': opts.strip()}


def preset_spec(text: str, scale: int) -> dict:
    """``'esc'`` or ``'esc:n_blocks=1'`` (``--preset``, overrides after the colon) -> spec dict."""
    name, _, overrides = text.partition(':')
    name = name.strip().lower()
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    fixed = PRESET_FIXED_SCALE.get(name)
    if fixed is not None and scale != fixed:
        raise BenchError(f'preset {name} exists only for x{fixed}, got --scale {scale}')
    arch_type, options = PRESETS[name]
    options = {**options, PRESET_SCALE_KEY[arch_type]: scale, **parse_options(overrides)}
    return {'label': name, 'type': registered_name(arch_type), 'options': options, 'source': f'--preset {text}',
            'variant': overrides.strip()}


def opt_spec(path: str) -> dict:
    """The ``network_g`` section of a BasicSR option YAML (read as ``basicsr train`` reads it) -> spec dict."""
    from .commands._pipeline import load_options
    from .messages import OptionError
    if not os.path.isfile(path):
        raise BenchError(f'cannot read option file {path}: ' + ('it is a folder' if os.path.isdir(path)
                                                                 else 'no such file'))
    try:
        opt = load_options(path)
    except OptionError as err:
        raise BenchError(str(err)) from None
    network = opt.get('network_g') if isinstance(opt, dict) else None
    if not isinstance(network, dict) or 'type' not in network:
        raise BenchError(f'option file {path} has no network_g section with a type')
    options = dict(network)
    arch_type = options.pop('type')
    label = opt.get('name') or os.path.splitext(os.path.basename(path))[0]
    return {'label': str(label), 'type': registered_name(arch_type), 'options': options, 'source': f'--opt {path}'}


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r'\s*(\d+)\s*[xX,]\s*(\d+)\s*', text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise BenchError(f'bad size {text!r}: expected HxW, e.g. 180x320')
    return int(match[1]), int(match[2])


def default_lr_size(scale: int) -> tuple[int, int]:
    """LR size whose x``scale`` output is 1280x720 (rounded down)."""
    if scale < 1:
        raise BenchError(f'--scale must be >= 1, got {scale}')
    if scale > min(DEFAULT_OUTPUT_SIZE):
        raise BenchError(f'--scale {scale} leaves no pixel of the default {DEFAULT_OUTPUT_SIZE[1]}x'
                         f'{DEFAULT_OUTPUT_SIZE[0]} output to start from: give --lr-size')
    return DEFAULT_OUTPUT_SIZE[0] // scale, DEFAULT_OUTPUT_SIZE[1] // scale


def validate_settings(settings: dict) -> None:
    import torch
    if settings['dtype'] not in DTYPES:
        raise BenchError(f"--dtype must be one of {', '.join(DTYPES)}, got {settings['dtype']!r}")
    device = settings['device']
    if device not in ('cpu', 'cuda') and not device.startswith('cuda:'):
        raise BenchError(f'--device must be cpu or cuda[:N], got {device!r}')
    if device != 'cpu' and not torch.cuda.is_available():
        raise BenchError(f'--device {device}: CUDA is not available on this machine (use --device cpu)')
    if settings['dtype'] == 'fp16' and device == 'cpu':
        raise BenchError('--dtype fp16 is CUDA only; on CPU use fp32 or bf16')
    if settings['runs'] < 1 or settings['warmup'] < 0:
        raise BenchError('--runs must be >= 1 and --warmup >= 0')
    if settings.get('threads') is not None and settings['threads'] < 1:
        raise BenchError('--threads must be >= 1')


def default_threads() -> int:
    """``--threads``' default: the CPUs this process may run on (its affinity mask: taskset, a cgroup
    cpuset, a Slurm allocation), not every core of the machine, which would oversubscribe them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity mask here (macOS, Windows)
        return os.cpu_count() or 1


def validate_timeout(timeout: float | None) -> None:
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise BenchError(f'--timeout must be a finite number of seconds > 0, got {timeout:g}')


def check_spec(spec: dict) -> None:
    """Check ``spec``'s options against its arch's constructor signature (unknown or missing
    arguments), so a bad spec is reported before anything is measured. Archs whose constructor
    takes ``**kwargs`` accept any name; only their required arguments are checked."""
    from basicsr.utils.registry import ARCH_REGISTRY
    registered_name(spec['type'])
    options = spec['options']
    if not isinstance(options, dict):
        raise BenchError(f"{spec['source']}: the options of {spec['type']} must be key=value pairs, got {options!r}")
    problem = options_problem(ARCH_REGISTRY.get(spec['type']), options)
    if problem:
        raise BenchError(f"{spec['source']}: cannot build {spec['type']}: {problem}")


def check_specs(specs: list[dict]) -> None:
    for spec in specs:
        check_spec(spec)


def _make_folder(folder: str, what: str) -> None:
    """Create ``folder`` (and its parents) and make sure a file can be written into it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BenchError(f'{what} {folder}: exists and is not a folder')
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.esc-bench-probe.', suffix='.tmp', dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BenchError(f'{what} {folder}: cannot write there: {err.strerror or err}') from None


def plot_format(path: str) -> str | None:
    """The matplotlib format ``path``'s extension names (``png``, ``svg``, ``pdf``, ...), checked
    by writing a tiny figure in it; None when matplotlib is not installed (no plot is made)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    supported = sorted(FigureCanvasAgg.get_supported_filetypes())
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in supported:
        problem = 'has no file extension' if not ext else f'.{ext} is not a format matplotlib writes'
        raise BenchError(f"--plot {path}: {problem}; use one of: {', '.join('.' + e for e in supported)}")
    fig, ax = plt.subplots(figsize=(1, 1))
    try:
        ax.set_title('x')
        fig.savefig(io.BytesIO(), format=ext)
    except Exception as err:  # e.g. jpg without Pillow, pgf without LaTeX
        raise BenchError(f'--plot {path}: matplotlib cannot write .{ext} here: {first_line(err)}') from None
    finally:
        plt.close(fig)
    return ext


def prepare_output(out_dir: str | None, plot: str | None = None) -> str | None:
    """Before anything is measured: create ``out_dir`` and the plot's folder (``plot`` is relative
    to ``out_dir``) and check the plot's format; returns the plot's path (None: no plot)."""
    if not out_dir:
        return None
    _make_folder(out_dir, '--out')
    if not plot:
        return None
    path = os.path.join(out_dir, plot)
    if os.path.isdir(path):
        raise BenchError(f'--plot {plot}: {path} is a folder')
    if plot_format(plot) is None:
        return path
    folder = os.path.dirname(path)
    if folder:
        _make_folder(folder, "--plot's folder")
    return path


def import_user_archs(items) -> list[str]:
    """The modules of ``--import`` imported in this process (the parent, then each measuring child),
    as ``plugins.import_arch_modules`` resolves them; a failure is a ``BenchError``."""
    from .plugins import PluginImportError, import_arch_modules
    try:
        return import_arch_modules(items)
    except PluginImportError as err:
        raise BenchError(str(err)) from None


# --------------------------------------------------------------------------------------
# measurements (these run inside the child process)
# --------------------------------------------------------------------------------------
def build_model(spec: dict):
    import basicsr.archs  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY
    registered_name(spec['type'])
    try:
        model = ARCH_REGISTRY.get(spec['type'])(**spec['options'])
    except Exception as err:  # the arch's own checks: asserts, KeyErrors, ...
        raise BenchError(f"cannot build {spec['type']} with options {spec['options']}: {describe_error(err)}") \
            from None
    return model.eval()


def describe_error(err: BaseException) -> str:
    """``Type: first line (at file:line in function)``: where an arch failed, in one line."""
    import traceback
    frames = traceback.extract_tb(err.__traceback__)
    where = f' (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})' if frames else ''
    message = (str(err).strip().splitlines() or [''])[0]
    return f'{type(err).__name__}{": " + message if message else ""}{where}'


def deploy_model(model):
    """The model as it runs at inference: ``deploy()`` where the arch has such a method (it may
    work in place and return None); ``(model, deployed)``. A ``deploy`` attribute that is not
    callable (RepVGG-style flags) is left alone."""
    deploy = getattr(model, 'deploy', None)
    if not callable(deploy):
        return model, False
    deployed = deploy()
    return (deployed if deployed is not None else model), True


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def window_multiple(model, spec: dict) -> int:
    """The window size inputs must be a multiple of (1 when the arch has none)."""
    size = getattr(model, 'window_size', None) or spec['options'].get('window_size') or 1
    if isinstance(size, (tuple, list)):
        return math.lcm(*(int(s) for s in size))
    return int(size)


def count_flops(model, x) -> dict:
    """Exact FLOPs of one forward of ``model`` on ``x`` (see the module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class SeenOps(TorchDispatchMode):
        """The ops that added no FLOPs (inside the counter, which decomposes ops it has no formula
        for, e.g. SDPA on the meta device into counted matmuls)."""

        def __init__(self, counter):
            super().__init__()
            self.ops, self.counter = set(), counter

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.counter.get_total_flops()
            out = func(*args, **(kwargs or {}))
            if self.counter.get_total_flops() == before:
                self.ops.add(func.overloadpacket)
            return out

    counted = copy.deepcopy(model)
    attn_type = None
    if hasattr(counted, 'set_attn_type'):
        counted.set_attn_type('naive')
        attn_type = 'naive'
    method = 'exact, meta device'
    try:
        counted, inp = counted.to('meta'), x.detach().to('meta', torch.float32)
        counted.float()
        result = _run_counter(counted, inp, FlopCounterMode, SeenOps)
    except Exception:  # an op without a meta kernel: count on the real device instead
        counted, inp = copy.deepcopy(model).float(), x.detach().float()
        if attn_type:
            counted.set_attn_type('naive')
        method = f'exact, {x.device.type} device (meta failed)'
        result = _run_counter(counted, inp, FlopCounterMode, SeenOps)
    flops, seen, registry = result
    uncounted = sorted(str(op) for op in seen
                       if ('attention' in str(op) or str(op).startswith('esc_arch.')) and op not in registry)
    return {'flops': flops, 'flops_method': method, 'flops_attn_type': attn_type, 'flops_uncounted_ops': uncounted}


def _run_counter(model, x, counter_cls, seen_cls):
    import torch

    from esc_arch.kernels import disabled
    # FlopCounterMode's module tracker hooks autograd for inputs that require grad (e.g. shared
    # filters passed between modules), which fails under inference_mode: count without grads.
    model.requires_grad_(False)
    counter = counter_cls(display=False)
    seen = seen_cls(counter)
    with torch.inference_mode(), disabled(), counter, seen:  # PyTorch's operators, which it counts
        model(x)
    return counter.get_total_flops(), seen.ops, counter.flop_registry


def _proc_status_kb(field: str) -> int | None:
    try:
        with open('/proc/self/status', encoding='ascii') as handle:
            for line in handle:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _max_rss_kb() -> int:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == 'darwin' else peak  # macOS reports bytes


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            for line in handle:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(spec: dict, settings: dict) -> dict:
    """One full measurement of ``spec`` in this process; returns the record."""
    import torch

    import esc_arch
    from esc_arch.archs.layers import reflect_pad_to_multiple
    from esc_arch.kernels import kernel_isa, window_attention_op

    validate_settings(settings)
    import_user_archs(settings.get('imports'))
    threads = settings.get('threads') or default_threads()
    torch.set_num_threads(threads)
    device = torch.device(settings['device'])
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[settings['dtype']]

    model = build_model(spec)
    params = count_params(model)
    reference_model = copy.deepcopy(model) if settings.get('check') else None
    model, deployed = deploy_model(model)
    model = model.to(device, dtype)
    if device.type == 'cpu' and any(type(m).__module__.startswith('esc_arch.') for m in model.modules()):
        window_attention_op()  # build or load the CPU kernels now, not inside the first (timed if --warmup 0) run
        # (ESC's family, or a user's arch of our layers)

    lr_h, lr_w = settings['lr_size']
    generator = torch.Generator().manual_seed(settings.get('seed', 0))
    x = torch.rand(1, 3, lr_h, lr_w, generator=generator)
    multiple = window_multiple(model, spec) if settings.get('pad', True) else 1
    x = reflect_pad_to_multiple(x, multiple)
    inp = x.to(device, dtype)

    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline_kb = torch.cuda.memory_allocated(device) // 1024
        baseline_hwm_kb = None
    else:
        baseline_kb, baseline_hwm_kb = _proc_status_kb('VmRSS'), _proc_status_kb('VmHWM')

    latencies = []
    with torch.inference_mode():
        for index in range(settings['warmup'] + settings['runs']):
            _sync(device)
            start = time.perf_counter()
            out = model(inp)
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1000
            if index >= settings['warmup']:
                latencies.append(elapsed)

    # which window-attention backends the timed forwards ran (ESC family; e.g. ['fused'] or, where
    # the fused CPU kernel could not be built, ['sdpa']); None for archs without them
    attention = sorted({m.last_backend for m in model.modules() if getattr(m, 'last_backend', None)}) or None
    fused_isa = kernel_isa() if attention and 'fused' in attention else None

    if device.type == 'cuda':
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory = {'peak_memory_mb': peak_mb, 'memory_baseline_mb': baseline_kb / 1024,
                  'memory_method': 'torch.cuda.max_memory_allocated over warm-up and timed runs (weights included)'}
    else:
        peak_kb = _max_rss_kb()
        memory = {'peak_memory_mb': (peak_kb - baseline_kb) / 1024 if baseline_kb is not None else None,
                  'memory_baseline_mb': baseline_kb / 1024 if baseline_kb is not None else None,
                  'memory_baseline_hwm_mb': baseline_hwm_kb / 1024 if baseline_hwm_kb is not None else None,
                  'memory_exceeded_baseline_hwm': baseline_hwm_kb is not None and peak_kb > baseline_hwm_kb,
                  'memory_method': 'child process: ru_maxrss after runs minus VmRSS before the first forward'}

    flops = count_flops(model, inp)  # after the memory reading: its fallback path runs a real forward
    check = None
    if reference_model is not None:
        if hasattr(reference_model, 'set_attn_type'):  # float64 values; no need of the timed backend
            reference_model.set_attn_type('sdpa')  # (flex on CUDA would compile a float64 kernel)
        with torch.inference_mode():
            reference = reference_model.double().to(device)(x.to(device, torch.float64))
        check = (out.double() - reference).abs().max().item()

    return {
        'arch': spec['label'], 'type': spec['type'], 'options': spec['options'], 'source': spec['source'],
        'imports': settings.get('imports') or [],
        'params': params, **flops, 'gflops': flops['flops'] / 1e9, 'macs': flops['flops'] // 2,
        'lr_size': [lr_h, lr_w], 'pad': bool(settings.get('pad', True)), 'input_size': list(x.shape[-2:]),
        'pad_multiple': multiple,
        'output_size': list(out.shape[-2:]), 'scale': out.shape[-1] / x.shape[-1],
        'device': str(device), 'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        'dtype': settings['dtype'], 'threads': threads, 'deployed': deployed, 'attention_backends': attention,
        # PyTorch's defaults: cuDNN convolutions in TF32 (fp32 inputs, 10-bit mantissa products), matmuls not
        'cuda_tf32': {'cudnn': torch.backends.cudnn.allow_tf32,
                      'matmul': torch.backends.cuda.matmul.allow_tf32} if device.type == 'cuda' else None,
        'fused_kernel_isa': fused_isa,
        'torch_version': torch.__version__, 'esc_arch_version': esc_arch.__version__,
        'python': platform.python_version(),
        'cpu_model': cpu_model(), 'hostname': platform.node(),
        'warmup': settings['warmup'], 'runs': settings['runs'], 'latencies_ms': latencies,
        'median_ms': statistics.median(latencies), 'min_ms': min(latencies), 'max_ms': max(latencies),
        **memory, 'check_max_abs_err': check,
        'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }


# --------------------------------------------------------------------------------------
# driver (parent process)
# --------------------------------------------------------------------------------------
# the worker runs the installed module without the current folder first on sys.path (``python -m``
# would put it there: a yaml.py or basicsr/ folder in it would be measured instead of the packages)
_WORKER = ('import sys; del sys.path[0]; import runpy; '
           'runpy.run_module("esc_arch.benchmark", run_name="__main__", alter_sys=True)')


def _worker_env() -> dict:
    """This process's environment, with this esc_arch's folder first on the worker's path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')]))
    return env


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f'was killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'was killed by signal {-code}'
    return f'exited with code {code}'


def _kill_session(leader: int) -> None:
    """SIGKILL the worker ``leader`` (not reaped yet, so its ids are still its own) and every process
    of its session: the compiler jobs of a first build of the CPU kernels, which ninja starts in
    process groups of their own, would otherwise run on into the next arch's timed runs."""
    os.killpg(leader, signal.SIGKILL)  # the worker and ninja first: nothing new is started
    try:
        entries = [entry for entry in os.listdir('/proc') if entry.isdigit()]
    except OSError:  # no /proc (macOS): the group is what can be found
        return
    for entry in entries:
        try:
            with open(f'/proc/{entry}/stat', encoding='utf-8', errors='replace') as handle:
                session = int(handle.read().rsplit(')', 1)[1].split()[3])  # after state, ppid, pgrp
            if session == leader:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue


def run_in_child(spec: dict, settings: dict, timeout: float | None = None) -> dict:
    """``measure`` in a fresh worker process (killed, and its folder removed, if this one is
    interrupted or times out)."""
    with tempfile.TemporaryDirectory(prefix='esc-bench-') as tmp:
        job, result = os.path.join(tmp, 'job.json'), os.path.join(tmp, 'result.json')
        with open(job, 'w', encoding='utf-8') as handle:
            json.dump({'spec': spec, 'settings': settings}, handle, default=str)
        proc = subprocess.Popen([sys.executable, '-c', _WORKER, '--worker', job, result, str(os.getpid())],
                                env=_worker_env(), start_new_session=True,  # its own group: see below
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{spec['label']}: measurement took longer than {timeout} s") from None
        finally:  # a timeout, Ctrl-C or SIGTERM here: the worker goes too, with what it started
            if proc.poll() is None:
                _kill_session(proc.pid)
                proc.wait()
        if not os.path.exists(result):
            lines = [line.strip() for line in (stderr or stdout or '').splitlines() if line.strip()]
            said = f': {lines[-1]}' if lines else ' without a message'
            raise BenchError(f"{spec['label']}: the measuring process {_exit_reason(proc.returncode)}{said}")
        with open(result, encoding='utf-8') as handle:
            answer = json.load(handle)
    if 'error' in answer:
        raise BenchError(answer['error'])
    return answer['record']


def _safe_name(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', text).strip('-') or 'arch'


def config_key(record: dict) -> str:
    """The arch configuration of a record or spec (type and constructor options) as a string."""
    return json.dumps({'type': record['type'], 'options': record['options']}, sort_keys=True, default=str)


def record_path(out_dir: str, record: dict) -> str:
    """``<label>_<config hash>_<device>_<dtype>_<HxW>_<time>.json``: the hash of the arch's type and
    options keeps records of different configurations under one label apart."""
    stamp = record['timestamp'].replace(':', '').replace('-', '').replace('+0000', 'Z')
    h, w = record['lr_size']
    digest = hashlib.sha1(config_key(record).encode('utf-8')).hexdigest()[:8]
    name = (f"{_safe_name(record['arch'])[:80]}_{digest}_{record['device'].replace(':', '')}_{record['dtype']}_"
            f"{h}x{w}_{stamp}.json")
    return os.path.join(out_dir, name)


def write_record(out_dir: str, record: dict) -> str:
    """Write ``record`` into ``out_dir`` under a name no other record has (a number is added
    when the same configuration was recorded in the same second); returns the path."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        base = record_path(out_dir, record)
        path, number = base, 1
        while os.path.lexists(path):
            number += 1
            path = f'{base[:-len(".json")]}_{number}.json'
        atomic_write_bytes(path, (json.dumps(record, indent=2) + '\n').encode('utf-8'))
    except OSError as err:
        raise BenchError(f"cannot write the record of {record['arch']} into {out_dir}: {first_line(err)}") from None
    return path


def record_padding(record: dict) -> bool | None:
    """Whether the harness padded the record's input to the arch's window (``--no-pad``: False);
    records written before this was stored: True when padding changed the input, else unknown."""
    if 'pad' in record:
        return bool(record['pad'])
    return True if (record.get('pad_multiple') or 1) > 1 else None


# what "measured the same way" means for records in one plot (padding is not part of it: ESC runs
# unpadded next to SwinIR padded to its window in one plot; a padded point is marked as such)
MEASURED_LIKE = ('device', 'device_name', 'cpu_model', 'dtype', 'lr_size', 'threads')


def measured_alike(record: dict, like: dict) -> bool:
    return all(record.get(k) == like.get(k) for k in MEASURED_LIKE)


def collect_records(out_dir: str, like: dict) -> list[dict]:
    """The newest record per arch configuration (type and options) in ``out_dir`` measured like
    ``like`` (device and its model, dtype, LR size, threads, padding), so separate ``basicsr
    bench`` runs into one folder share one plot."""
    newest = {}
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith('.json') or name.startswith('.'):
            continue
        try:
            with open(os.path.join(out_dir, name), encoding='utf-8') as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue
        if not (isinstance(record, dict) and {'arch', 'type', 'options', 'timestamp'} <= record.keys()
                and isinstance(record['options'], dict) and isinstance(record['timestamp'], str)
                and all(isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)
                        for key in ('params', 'median_ms'))):
            continue  # not a record this tool wrote (or edited by hand): not plotted
        if not measured_alike(record, like):
            continue
        key = (config_key(record), record_padding(record))  # padded and unpadded runs are two points
        if key not in newest or record['timestamp'] >= newest[key]['timestamp']:
            newest[key] = record
    return list(newest.values())


def _option_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(',', ':'), default=str)


def plot_labels(records: list[dict]) -> list[str]:
    """One distinct label per record: records of different configurations that share a label get
    the options they differ in (``esc:n_blocks=1``, ``esc:n_blocks=2``), then a number if need be."""
    labels = [record['arch'] for record in records]
    groups = collections.defaultdict(list)
    for index, record in enumerate(records):
        groups[record['arch']].append(index)
    for label, indices in groups.items():
        if len(indices) < 2:
            continue
        configs = [{'type': records[i]['type'], **records[i]['options']} for i in indices]
        names = sorted(set().union(*configs))
        differing = [n for n in names if len({json.dumps(c.get(n), sort_keys=True, default=str)
                                               for c in configs}) > 1]
        for index, config in zip(indices, configs):
            parts = [f'{n}={_option_text(config[n]) if n in config else "-"}' for n in differing]
            if parts:
                labels[index] = label + (',' if ':' in label else ':') + ','.join(parts)
    if len({record_padding(record) for record in records}) > 1:  # mixed: the padded points say so
        for index, record in enumerate(records):
            if record_padding(record):
                labels[index] += f" (padded to {'x'.join(map(str, record['input_size']))})"
    seen = collections.Counter()
    for index, label in enumerate(labels):
        seen[label] += 1
        if seen[label] > 1:
            labels[index] = f'{label}#{seen[label]}'
    return labels


def plot_title(records: list[dict]) -> str:
    """How the plotted records were measured (that of the first; the padding that of them all)."""
    first = records[0]
    paddings = {record_padding(record) for record in records}
    if len(paddings) > 1:
        padding = ' (inputs padded where marked)'
    else:
        padding = {True: ' (each arch padded to its window)', False: ' (inputs not padded)'}.get(paddings.pop(), '')
    return (f"{first['device']} {first['dtype']}, LR {first['lr_size'][0]}x{first['lr_size'][1]}{padding}, "
            f"{first['threads']} threads")


def plot_records(records: list[dict], path: str) -> str | None:
    """Latency vs parameters, one labelled point per record, in the format ``path``'s extension
    names; None when matplotlib is missing."""
    fmt = plot_format(path)
    if fmt is None:
        return None
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for record, label in zip(records, plot_labels(records)):
        ax.scatter(record['params'] / 1e6, record['median_ms'])
        ax.annotate(label, (record['params'] / 1e6, record['median_ms']), textcoords='offset points',
                    xytext=(4, 4), fontsize=9)
    ax.set_xlabel('parameters (M)')
    ax.set_ylabel('median latency (ms)')
    ax.set_title(plot_title(records), fontsize=10)
    ax.grid(alpha=0.3)
    with warnings.catch_warnings():  # 'Tight layout not applied' where long labels leave no room
        warnings.simplefilter('ignore', UserWarning)
        fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    finally:
        plt.close(fig)
    return path


def format_table(records: list[dict]) -> str:
    header = ('arch', 'params', 'GFLOPs', 'median ms', 'min ms', 'max ms', 'peak MB', 'input')
    rows = [header]
    for r in records:
        peak = '-' if r['peak_memory_mb'] is None else f"{r['peak_memory_mb']:.1f}"
        rows.append((r['arch'], f"{r['params']:,}", f"{r['gflops']:.2f}", f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
                     f"{r['max_ms']:.1f}", peak, 'x'.join(map(str, r['input_size']))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def unique_labels(specs: list[dict]) -> list[dict]:
    """Make the labels unique, so records and plot points can be told apart: a name given more
    than once gets its options (``esc:attn_type=flex`` next to ``esc:attn_type=sdpa``), then a
    number if need be (``esc#2``)."""
    counts = collections.Counter(spec['label'] for spec in specs)
    for spec in specs:
        if counts[spec['label']] > 1 and spec.get('variant'):
            spec['label'] = f"{spec['label']}:{spec['variant']}"
    seen = {}
    for spec in specs:
        seen[spec['label']] = seen.get(spec['label'], 0) + 1
        if seen[spec['label']] > 1:
            spec['label'] = f"{spec['label']}#{seen[spec['label']]}"
    return specs


def run_benchmarks(specs: list[dict], settings: dict, out_dir: str | None = None, progress: bool = True,
                   timeout: float | None = None, failures: list | None = None) -> list[dict]:
    """Measure every spec in its own child process; write one JSON record each into ``out_dir``.
    A measurement that fails raises ``BenchError``, or, given a ``failures`` list, is appended
    to it as (label, message) and the other specs are measured."""
    from tqdm import tqdm
    validate_settings(settings)  # every check before the first measurement
    validate_timeout(timeout)
    import_user_archs(settings.get('imports'))  # (done already by the CLI) their arch names
    check_specs(specs)
    prepare_output(out_dir)
    unique_labels(specs)
    records = []
    bar = tqdm(specs, desc='bench', unit='arch', disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec['label'])
        try:
            record = run_in_child(spec, settings, timeout=timeout)
        except BenchError as err:
            if failures is None:
                raise
            failures.append((spec['label'], str(err)))
            tqdm.write(f'basicsr bench: error: {err}', file=sys.stderr)
            continue
        if out_dir:
            record['record_path'] = write_record(out_dir, record)
        records.append(record)
    return records


def _worker_main(job_path: str, result_path: str, parent: int | None = None) -> int:
    from .runtime import die_with_parent, tune_cpu_allocator
    die_with_parent(parent)  # not measuring on as an orphan
    tune_cpu_allocator()  # as in every `basicsr` command; the same for every arch measured
    with open(job_path, encoding='utf-8') as handle:
        job = json.load(handle)
    try:
        answer = {'record': measure(job['spec'], job['settings'])}
    except BenchError as err:
        answer = {'error': str(err)}
    except Exception as err:  # e.g. an arch that rejects the size: its error and where, in one line
        answer = {'error': f"{job['spec']['label']}: {describe_error(err)}"}
    atomic_write_bytes(result_path, json.dumps(answer).encode('utf-8'))
    return 0


if __name__ == '__main__':
    if len(sys.argv) in (4, 5) and sys.argv[1] == '--worker':
        sys.exit(_worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else None))
    sys.exit('usage: python -m esc_arch.benchmark --worker JOB.json RESULT.json [PARENT_PID] (use `basicsr bench` '
             'instead)')
