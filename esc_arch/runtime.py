"""Process-level settings that make CPU inference faster."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = None


def tune_cpu_allocator() -> bool:
    """Let glibc keep freed large blocks for reuse instead of unmapping them.

    PyTorch's CPU tensors come straight from ``malloc``; glibc serves every block above 128 KiB
    (its default mmap threshold) with a fresh ``mmap`` and unmaps it on free, so each
    activation of a forward pass is page-faulted and zeroed by the kernel again. ESC x4 on a
    180x320 image made ~3 million page faults per forward; with these two settings ~0.2
    million, and a forward took ~4.0 s instead of ~5.3 s on 2 cores (peak RSS about the
    same). Returns True when the settings were applied (Linux with glibc), else False.
    """
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith('linux'):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
                _tuned = (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
                          and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
            except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
                _tuned = False
    return _tuned


def slow_bf16_warning(device) -> str | None:
    """A warning where bfloat16 on ``device`` would be far slower than float32, else None.

    On a CPU for which PyTorch has no oneDNN bf16 kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
    is False: x86 CPUs without AVX-512, e.g. AMD Zen 3) every bf16 convolution falls back to
    PyTorch's reference path (one im2col + GEMM per channel group): on a 2-core AMD EPYC, ESC x4 on
    a 64x64 input took 35 s in bf16 against 0.21 s in fp32, EDSR-baseline 16.3 s against 0.17 s.
    """
    import torch
    if torch.device(device).type != 'cpu':
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if native:
        return None
    return ('bf16 on this CPU is ~100x slower than fp32: PyTorch has no oneDNN bf16 convolutions for it '
            '(torch.ops.mkldnn._is_mkldnn_bf16_supported() is False; they need AVX-512), so every bf16 '
            'convolution takes its slow reference path; use fp32 here')


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this (worker) process gets SIGTERM when the process that started it ends, however it
    ends (``kill -9`` included), instead of working on as an orphan. ``parent``: that process's pid,
    for a parent that ended before this call (the signal is only armed for a parent still there)."""
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # adopted already: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's stop), handled as Ctrl-C is: what is under way ends
    cleanly (``finally`` blocks, temp files, worker processes), and the command exits 143."""


def _raise_terminated(signum, frame):
    raise Terminated


class sigterm_as_interrupt:
    """While active, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread
    instead of ending the process at once; the previous handler is put back after. Elsewhere than in
    the main thread (where Python allows no signal handlers) it does nothing."""

    def __enter__(self):
        import signal
        import threading
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            import signal
            signal.signal(signal.SIGTERM, self._previous)
        return False
