"""Native CPU kernels for inference, compiled on first use with PyTorch's C++ extension loader.

One library of float32 kernels:

- ``window_attention`` (``window_attention_cpu.cpp``): ESC's window attention with the relative
  position bias read from its (2w-1)^2 table instead of a dense (heads, w^2, w^2) tensor.
- ``conv_ffn`` (``conv_ffn_cpu.cpp``): the ConvFFN (1x1 -> GELU -> depthwise 3x3 -> GELU +
  residual -> 1x1) in one pass over rows of a channels-last image, its hidden maps kept in cache.
- ``spectral_mix`` (``spectral_cpu.cpp``): the channel mixing of an FFT convolution whose filter
  is mirror-symmetric in both axes (ESC's symmetrised large kernel), its spectrum built on the fly
  from row and column factors instead of read from memory.
- ``pad_planes`` and ``conv_attn_merge`` (``conv_attn_cpu.cpp``): the ConvAttn's way from the
  channels-last activations to the FFT's zero-padded planes, and back with the dynamic 3x3 added.
- ``layer_norm`` (``layer_norm_cpu.cpp``): LayerNorm over the channels of a channels-last map.
- ``conv3x3`` (``conv3x3_cpu.cpp``): 3x3 convolution by Winograd's F(2x2, 3x3) or F(4x4, 3x3) on
  channels-last maps, optionally adding a residual.
- ``conv1x1`` (``conv1x1_cpu.cpp``): 1x1 convolution of a channels-last map as register-blocked
  GEMMs, optionally adding a residual in place (used by the AVX2 build; see ``conv1x1_preferred``).

The library is built for the CPU's vector ISA: AVX-512 where PyTorch itself runs AVX-512 code,
else AVX2 + FMA (``ESC_CPU_KERNELS=avx2`` forces the AVX2 build, e.g. to compare the two). The
first use of an install compiles it (30-60 s with g++; cached in PyTorch's extensions folder,
``TORCH_EXTENSIONS_DIR`` moves it); later processes load the cached library. Where it cannot be
built or run (no C++ compiler, a CPU without AVX2, ``ESC_CPU_KERNELS=0``) the accessors return
None after one warning and the layers use PyTorch's operators, which compute the same values.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shlex
import shutil
import struct
import sys
import threading
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / 'window_attention_cpu.cpp', HERE / 'conv_ffn_cpu.cpp', HERE / 'spectral_cpu.cpp',
           HERE / 'conv_attn_cpu.cpp', HERE / 'layer_norm_cpu.cpp', HERE / 'conv3x3_cpu.cpp',
           HERE / 'conv1x1_cpu.cpp']
HEADERS = [HERE / 'vec.h', HERE / 'gemm.h', HERE / 'parallel.h']
ENV_SWITCH = 'ESC_CPU_KERNELS'
logger = logging.getLogger(__name__)

_state: dict = {}  # 'ok': whether the library loaded, 'why': why not
_disabled = threading.local()  # .on: inside disabled(), per thread (another thread keeps the kernels)

# compiler flags of each build; the sources pick their vector width from the macros they define
ISA_FLAGS = {'avx2': ['-mavx2', '-mfma'], 'avx512': ['-mavx512f', '-mavx2', '-mfma']}
_OFF = ('0', 'false', 'no', 'off')
_KNOWN = _OFF + ('1', 'true', 'yes', 'on', '', 'avx2')
# the window-attention kernel's query blocks in each build (AVX2: 6 rows, or 4 on AMD CPUs)
ATTENTION_BLOCK_ROWS = {'avx2': (4, 6), 'avx512': (8, )}


def cpu_supports_kernel() -> bool:
    """An x86-64 CPU on which PyTorch itself dispatches to AVX2 (or AVX-512) code."""
    capability = torch.backends.cpu.get_cpu_capability()
    return platform.machine().lower() in ('x86_64', 'amd64') and capability.startswith(('AVX2', 'AVX512'))


def _switch() -> str:
    return os.environ.get(ENV_SWITCH, '1').strip().lower()


def kernel_isa() -> str | None:
    """The build this process uses: 'avx512', 'avx2', or None (switched off or no AVX2)."""
    if _switch() in _OFF or not cpu_supports_kernel():
        return None
    if _switch() == 'avx2' or not torch.backends.cpu.get_cpu_capability().startswith('AVX512'):
        return 'avx2'
    return 'avx512'


def _build() -> tuple[bool, str | None]:
    isa = kernel_isa()
    if isa is None:  # switched off, or a CPU without AVX2
        if _switch() in _OFF:
            return False, f'{ENV_SWITCH}={_switch()}'
        return False, f'this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) has no AVX2'
    # the loader rebuilds when a source or a flag changes; the digest makes a header change one too
    digest = hashlib.sha1(b''.join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]
    name = build_name(isa)
    compiler = os.environ.get('CXX', 'c++')  # what PyTorch's loader runs (it may be 'ccache g++')
    quiet = logging.getLogger('torch.utils.cpp_extension')  # "No CUDA runtime is found" on CPU machines,
    level = quiet.level  # said when the loader is first imported (here, or for a prebuilt library)
    quiet.setLevel(logging.ERROR)
    try:
        if shutil.which((shlex.split(compiler) or [''])[0]) is None:
            if _load_prebuilt(name, digest):
                return True, None
            return False, f'no C++ compiler: {compiler} is not on PATH (install g++, or set CXX)'
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from torch.utils import cpp_extension
            _announce_a_first_build(cpp_extension, name, isa)
            cpp_extension.load(name=name, sources=[str(p) for p in SOURCES],
                               extra_cflags=['-O3', *ISA_FLAGS[isa], '-fopenmp', f'-DESC_KERNELS_DIGEST={digest}'],
                               extra_ldflags=['-fopenmp'], is_python_module=False)
    except Exception as err:  # no compiler / ninja, or a failed build: fall back, say why
        if _load_prebuilt(name, digest):  # e.g. a read-only folder, which PyTorch's loader cannot lock
            return True, None
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        said = [line for line in lines if 'error:' in line or 'Killed signal' in line] or lines[-1:]
        return False, f'building it failed: {said[0]}'
    finally:
        quiet.setLevel(level)
    return True, None


def build_name(isa: str) -> str:
    """The library's (and its build folder's) name. One per install: its build.ninja names the
    sources by their absolute path, so two installs sharing one (a checkout and a venv) would
    rebuild each other's on every switch."""
    return f'esc_arch_cpu_kernels_{isa}_{hashlib.sha1(str(HERE.resolve()).encode()).hexdigest()[:8]}'


def _library_path(cpp_extension, name: str) -> str:
    """Where PyTorch's loader builds the library ``name`` (a private helper of it: may raise)."""
    return os.path.join(cpp_extension._get_build_directory(name, verbose=False), f'{name}.so')


def _load_prebuilt(name: str, digest: str) -> bool:
    """Load a library built before from these very sources (its build.ninja holds their digest; it
    is complete and newer than build.ninja) without PyTorch's loader, which must lock the folder
    and may need a compiler: a shared install built once into a read-only place, a node without g++."""
    try:
        from torch.utils import cpp_extension
        library = _library_path(cpp_extension, name)
        ninja = os.path.join(os.path.dirname(library), 'build.ninja')
        if not (os.path.isfile(library) and complete_elf(library) and os.path.isfile(ninja)
                and f'-DESC_KERNELS_DIGEST={digest}' in Path(ninja).read_text(errors='replace')
                and os.path.getmtime(library) >= os.path.getmtime(ninja)):
            return False
        torch.ops.load_library(library)
    except Exception:
        return False
    return True


def complete_elf(path: str) -> bool:
    """Whether the ELF file at ``path`` holds its section header table, which linkers write last: a
    library truncated by a full disk or a killed copy fails this (loading one dies of SIGBUS, and
    ninja, seeing it newer than its objects, would not link it again), as does one cut within its
    64-byte ELF header (an empty file): the kernels are built on x86-64 only, as 64-bit ELF files."""
    try:
        with open(path, 'rb') as handle:
            header = handle.read(64)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    if len(header) < 64:
        return False
    if header[:4] != b'\x7fELF' or header[4] != 2 or header[5] != 1:
        return True  # not a 64-bit little-endian ELF: leave it to the loader to judge
    sh_offset, = struct.unpack_from('<Q', header, 0x28)
    sh_entsize, sh_count = struct.unpack_from('<HH', header, 0x3A)
    return size >= sh_offset + sh_entsize * sh_count


def _announce_a_first_build(cpp_extension, name: str, isa: str) -> None:
    """A line on stderr when the library is not built yet: the first call then takes a minute. A
    truncated library is removed (or, cut within its header, made old) first, so that it is linked again."""
    try:
        library = _library_path(cpp_extension, name)
    except Exception:  # a private helper of PyTorch's loader: say nothing rather than fail
        return
    relink = os.path.isfile(library) and not complete_elf(library)
    if relink:
        with contextlib.suppress(OSError):
            if os.path.getsize(library) < 64:  # also how ld starts a link another process may be running:
                os.utime(library, (0, 0))  # made older than its objects (ninja links it again), not removed
            else:
                os.unlink(library)
    if relink or not os.path.isfile(library):
        print(f'esc_arch: compiling the CPU kernels ({isa}) for this install, once (a minute or two; cached in '
              f'{os.path.dirname(os.path.dirname(library))})', file=sys.stderr, flush=True)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` from the caller that names the first frame outside
    esc_arch and torch (the user's line that ran the model), not a line of our layers."""
    inside = (str(HERE.parent), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def _loaded() -> bool:
    if 'ok' not in _state:
        if _switch() not in _KNOWN:
            warnings.warn(f'esc_arch: {ENV_SWITCH}={os.environ[ENV_SWITCH]!r} means nothing here (0 switches the '
                          'CPU kernels off, avx2 forces their AVX2 build); using the default',
                          stacklevel=_outside_stacklevel())
        _state['ok'], _state['why'] = _build()
        if not _state['ok']:
            warnings.warn(f'esc_arch: the CPU kernels are unavailable ({_state["why"]}); using PyTorch '
                          'operators, which compute the same values more slowly', stacklevel=_outside_stacklevel())
    return _state['ok']


def _is_disabled() -> bool:
    return getattr(_disabled, 'on', False)


def _op(name: str):
    """``torch.ops.esc_arch.<name>``, or None while ``disabled()`` or where the library is unavailable."""
    return getattr(torch.ops.esc_arch, name) if not _is_disabled() and _loaded() else None


@contextlib.contextmanager
def disabled():
    """Within this block the accessors return None, so the layers run PyTorch's aten operators (e.g.
    to count FLOPs, which PyTorch's counter cannot see inside a custom kernel)."""
    before = _is_disabled()
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = before


def window_attention_op():
    """The compiled ``torch.ops.esc_arch.window_attention`` or None (reason: ``unavailable_reason()``).

    op(q, k, v, table, rows, cols, window_size, scale, out, block_rows=0): q/k/v/out (B, H, W,
    heads, head_dim) float32 with contiguous last dims (any other strides), table (heads, 2w-1,
    2w-1) or a dense bias (heads, w*w, w*w) (FlashBias models); the image is padded bottom/right
    to whole w x w windows, rows / cols (int64) giving the image row / column each padded
    position copies. Writes each pixel's attention over its window
    into out. ``block_rows``: queries per register block, 0 for the build's choice on this CPU
    (``ATTENTION_BLOCK_ROWS`` lists what each build has; the same values with any).
    """
    return _op('window_attention')


def conv_ffn_op():
    """The compiled ``torch.ops.esc_arch.conv_ffn`` or None (reason: ``unavailable_reason()``).

    op(x, w1, b1, wd, bd, w2, b2, out): x (B, H, W, C) and out (B, H, W, C_out) contiguous
    float32, C_out a multiple of 8; w1 (hidden, C), wd (hidden, 9) the depthwise 3x3 kernels,
    w2 (C_out, hidden) and their biases; writes GELU(dw(h) + bd) + h, h = GELU(x w1^T + b1),
    projected by w2, into out.
    """
    return _op('conv_ffn')


def spectral_mix_op():
    """The compiled ``torch.ops.esc_arch.spectral_mix`` or None (reason: ``unavailable_reason()``).

    op(signal, rows, cols, out): signal (B, I, H, W, 2) and out (B, O, H, W, 2) complex values as
    float32 (re, im) pairs, rows (H, I, O, T) and cols (T, W) float32 with 2 <= T <= 8, all
    contiguous; writes out[b, o, u, v] = sum_i signal[b, i, u, v] sum_t rows[u, i, o, t] cols[t, v].
    """
    return _op('spectral_mix')


def pad_planes_op():
    """The compiled ``torch.ops.esc_arch.pad_planes`` or None (reason: ``unavailable_reason()``).

    op(x, out): x (B, H, W, P) float32 with a contiguous last dim, out a contiguous (B, P, Hf, Wf)
    with Hf >= H, Wf >= W; writes x's planes into out's top-left corner and zeros elsewhere.
    """
    return _op('pad_planes')


def conv_attn_merge_op():
    """The compiled ``torch.ops.esc_arch.conv_attn_merge`` or None (reason: ``unavailable_reason()``).

    op(lk, x1, kernel, out): lk and x1 (B, P, H, W) planes, kernel (B, P, 9) contiguous, out
    (B, H, W, P), float32 with contiguous last dims; writes lk + (x1 convolved with each sample's
    and plane's 3x3 kernel, zero padding) into out.
    """
    return _op('conv_attn_merge')


def layer_norm_op():
    """The compiled ``torch.ops.esc_arch.layer_norm`` or None (reason: ``unavailable_reason()``).

    op(x, weight, bias, eps, out): x and out contiguous float32 of one shape, weight and bias of
    its last dim's size; writes F.layer_norm(x, (C,), weight, bias, eps) into out.
    """
    return _op('layer_norm')


def conv3x3_op():
    """The compiled ``torch.ops.esc_arch.conv3x3`` or None (reason: ``unavailable_reason()``).

    op(x, weight, bias, residual, out, tile=0): x (B, H, W, C) and out (B, H, W, O) contiguous
    float32, C and O multiples of 8, weight (O, C, 3, 3), bias (O), residual None or shaped as out;
    writes conv2d(x, weight, bias, padding=1) (+ residual) into out, in channels-last order, by
    Winograd's F(tile x tile, 3x3): tile 2 (also 0, the default) or 4.
    """
    return _op('conv3x3')


def conv1x1_op():
    """The compiled ``torch.ops.esc_arch.conv1x1`` or None (reason: ``unavailable_reason()``).

    op(x, weight, bias, residual, out): x (B, H, W, C) and out (B, H, W, O) contiguous float32,
    O a multiple of 8, weight (O, C), bias (O), residual None, out itself, or a tensor shaped as
    out; writes x W^T + bias (+ residual) into out.
    """
    return _op('conv1x1')


def conv1x1_preferred() -> bool:
    """Whether the 1x1 convolutions of CPU inference go through ``conv1x1`` rather than oneDNN: in
    the AVX2 build (AMD EPYC, Zen 3: oneDNN's 64 -> 192 / 64 -> 64 at 180x320 11.3-12.5 / 4.2-4.6 ms,
    ``conv1x1`` 9.8-11.1 / 3.4-3.7 ms); the AVX-512 build keeps oneDNN, which ran ESC's qkv there
    at ~90% of the FMA peak (4.5 ms, Xeon)."""
    return kernel_isa() == 'avx2' and conv1x1_op() is not None


def onednn_conv_add_op():
    """oneDNN's convolution that adds its result into a given tensor in place (an operator of
    PyTorch's CPU build with mkldnn, the one Inductor fuses conv + add with), or None where
    that is missing or while ``disabled()``.

    op(residual, x, weight, bias, padding, stride, dilation, groups, 'add', 1.0, None, [], None)
    """
    if _is_disabled():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def unavailable_reason() -> str | None:
    _loaded()
    return _state['why']


def fused_attention_applies(head_dim: int, window_size: int) -> bool:
    """Whether the fused kernel can compute a window attention of this shape (head dim
    8/16/24/32, window size a multiple of 8) and is available; the caller checks that it is
    CPU float32 inference."""
    return head_dim in (8, 16, 24, 32) and window_size % 8 == 0 and window_attention_op() is not None
