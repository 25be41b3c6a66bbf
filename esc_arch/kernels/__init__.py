"""Native kernels, compiled on first use with PyTorch's C++ extension loader.

``window_attention`` is a fused CPU kernel for ESC's window attention at inference
(``window_attention_cpu.cpp``): float32, the relative position bias read from its (2w-1)^2
table instead of a dense (heads, w^2, w^2) tensor. It is built for the CPU's vector ISA: AVX-512
where PyTorch itself runs AVX-512 code, else AVX2 + FMA (``ESC_FUSED_ATTENTION=avx2`` forces
the AVX2 build, e.g. to compare the two). The first call on a machine
compiles it (about 15 s with g++; cached in PyTorch's extensions folder, ``TORCH_EXTENSIONS_DIR``
moves it); later processes load the cached library. Where it cannot be built or run (no C++
compiler, a CPU without AVX2, ``ESC_FUSED_ATTENTION=0``) ``window_attention_op()`` returns
None once with a warning, and the model uses PyTorch's SDPA, which computes the same values.
"""
from __future__ import annotations

import logging
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name('window_attention_cpu.cpp')
ENV_SWITCH = 'ESC_FUSED_ATTENTION'
logger = logging.getLogger(__name__)

_state: dict = {}  # 'op': the loaded op or None, 'why': why it is None


def cpu_supports_kernel() -> bool:
    """An x86-64 CPU on which PyTorch itself dispatches to AVX2 (or AVX-512) code."""
    capability = torch.backends.cpu.get_cpu_capability()
    return platform.machine().lower() in ('x86_64', 'amd64') and capability.startswith(('AVX2', 'AVX512'))


# compiler flags of each build; the source picks its vector width from the macros they define
ISA_FLAGS = {'avx2': ['-mavx2', '-mfma'], 'avx512': ['-mavx512f', '-mavx2', '-mfma']}


_OFF = ('0', 'false', 'no', 'off')


def _switch() -> str:
    return os.environ.get(ENV_SWITCH, '1').strip().lower()


def kernel_isa() -> str | None:
    """The build this process uses: 'avx512', 'avx2', or None (switched off or no AVX2)."""
    if _switch() in _OFF or not cpu_supports_kernel():
        return None
    if _switch() == 'avx2' or not torch.backends.cpu.get_cpu_capability().startswith('AVX512'):
        return 'avx2'
    return 'avx512'


def _build():
    if _switch() in _OFF:
        return None, f'{ENV_SWITCH}={_switch()}'
    if not cpu_supports_kernel():
        return None, f'this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) has no AVX2'
    isa = kernel_isa()
    logger.info(f'esc_arch: loading the fused CPU window-attention kernel ({isa}; compiled once per machine, ~15 s)')
    quiet = logging.getLogger('torch.utils.cpp_extension')  # "No CUDA runtime is found" on CPU machines
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from torch.utils import cpp_extension
            cpp_extension.load(name=f'esc_arch_window_attention_{isa}', sources=[str(SOURCE)],
                               extra_cflags=['-O3', *ISA_FLAGS[isa], '-fopenmp'],
                               extra_ldflags=['-fopenmp'], is_python_module=False)
    except Exception as err:  # no compiler / ninja, or a failed build: fall back, say why
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return None, f'building it failed: {lines[-1]}'
    finally:
        quiet.setLevel(level)
    return torch.ops.esc_arch.window_attention, None


def window_attention_op():
    """The compiled ``torch.ops.esc_arch.window_attention`` or None (reason: ``unavailable_reason()``).

    op(q, k, v, table, window_size, query_cols, scale, out): q/k/v/out (..., heads, tokens,
    head_dim) float32 with contiguous last dims, k/v with all w*w tokens of their window, query
    i at (i // query_cols, i % query_cols) of it, table (heads, 2w-1, 2w-1); writes into out.
    """
    if 'op' not in _state:
        _state['op'], _state['why'] = _build()
        if _state['op'] is None:
            warnings.warn(f'esc_arch: fused CPU window attention unavailable ({_state["why"]}); '
                          'using PyTorch SDPA, which computes the same values more slowly', stacklevel=2)
    return _state['op']


def unavailable_reason() -> str | None:
    window_attention_op()
    return _state['why']


def fused_attention_applies(q: torch.Tensor, window_size: int) -> bool:
    """Whether the fused kernel can compute this attention: CPU float32 without autograd,
    head dim 8/16/24/32, window size a multiple of 8, and the kernel available."""
    return (q.device.type == 'cpu' and q.dtype == torch.float32 and not torch.is_grad_enabled()
            and q.shape[-1] in (8, 16, 24, 32) and window_size % 8 == 0 and window_attention_op() is not None)
