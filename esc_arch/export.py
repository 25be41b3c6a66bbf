"""Export ESC checkpoints to ONNX (dynamic batch, height and width) or to ``.safetensors``.

The ONNX graph is the deployed model wrapped as in :class:`esc_arch.inference.Upscaler`:
reflect-pad H and W to a multiple of the window size, run, crop to scale x input. Two things
in the eager model are not traceable for dynamic shapes and are handled here, at export time:

* the window attention's own padding loop (``reflect_pad_to_multiple``) is Python control flow:
  the wrapper pads first, with one traced ``F.pad``, so inside the model nothing needs padding;
* the per-sample depthwise conv of the convolutional attention folds the batch into the conv
  groups (``groups = batch * channels``), a constant in ONNX: while tracing it is replaced by
  an equivalent sum of shifted products, which works for any batch; and the large kernel's
  CPU FFT path (not exportable) is switched off.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fileio import atomic_path

ONNX_TOLERANCE = {'fp32': 1e-4, 'fp16': 1e-2}
EXPORT_ATTN_TYPES = ('naive', 'sdpa')
# the lowest opset each traced attention exports at (measured: SDPA is an ONNX op from 14 on; the
# naive path's repeat_interleave needs 13, the wrapper's dynamic pad 11)
MIN_OPSET = {'naive': 13, 'sdpa': 14}


def max_opset() -> int | None:
    """The newest opset PyTorch's TorchScript exporter writes (20 in torch 2.14), if it says."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, 'ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET', None)


class ExportError(ValueError):
    """A user-facing export problem (missing packages, unsupported option, failed check)."""


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f'ONNX export needs onnx and onnxruntime ({exc.name} is missing): '
                          'pip install esc-arch[export]') from exc
    return onnxruntime


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """The model's plain state dict as ``.safetensors`` (readable by ``esc_arch.load_model``)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    from safetensors import SafetensorError
    with atomic_path(path, failed_writes=(SafetensorError, )) as tmp:  # 'I/O error: File too large'
        save_file(state, tmp, metadata={'format': 'pt', 'arch': type(model).__name__})
    return path


class PadRunCrop(nn.Module):
    """Reflect-pad H, W to a multiple of the window size, run ``model``, crop to scale x input.

    Inputs must be more than window_size / 2 on each side (one reflection; the eager
    ``reflect_pad_to_multiple`` repeats it for smaller inputs, which is not traceable).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.window = int(model.window_size)
        self.scale = int(model.upscaling_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.window, 0, (-h) % self.window), mode='reflect')
        return self.model(x)[:, :, :h * self.scale, :w * self.scale]


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17, fp16: bool = False,
                attn_type: str = 'sdpa') -> Path:
    """Trace the deployed ``model`` (legacy TorchScript exporter) into an ONNX file with
    dynamic batch, height and width; input ``input`` (N, 3, H, W) in [0, 1], output ``output``."""
    require_onnx()
    if attn_type not in EXPORT_ATTN_TYPES:
        raise ExportError(f'ONNX export supports attention {", ".join(EXPORT_ATTN_TYPES)}, got {attn_type!r}')
    if opset < MIN_OPSET[attn_type]:
        lower = [f'--attn {name} exports from opset {least}' for name, least in MIN_OPSET.items() if least <= opset]
        raise ExportError(f'opset {opset} is too old for the {attn_type} attention (it needs {MIN_OPSET[attn_type]} '
                          f'or later){"; " + lower[0] if lower else ""}')
    newest = max_opset()
    if newest is not None and opset > newest:  # a 20-digit opset was a TypeError from deep in the exporter
        raise ExportError(f'opset {opset} is newer than this PyTorch exports (at most {newest})')
    path = Path(path)
    model = copy.deepcopy(model).cpu().deploy()  # the caller's model stays as it was
    model.set_attn_type(attn_type)
    dtype = torch.float16 if fp16 else torch.float32
    wrapper = PadRunCrop(model).to(dtype).eval()
    window = wrapper.window
    sample = torch.rand(1, 3, 2 * window, 2 * window, dtype=dtype)
    # an OSError of the exporter is its write failing (a full disk: 'File too large')
    with atomic_path(path, failed_writes=(OSError, )) as tmp, warnings.catch_warnings(), torch.no_grad(), \
            _without_native_stdout():
        warnings.simplefilter('ignore')  # TracerWarnings on the shape arithmetic, checked by verify_onnx
        torch.onnx.export(wrapper, (sample, ), tmp, dynamo=False, opset_version=opset,
                          input_names=['input'], output_names=['output'],
                          dynamic_axes={'input': {0: 'batch', 2: 'height', 3: 'width'},
                                        'output': {0: 'batch', 2: 'out_height', 3: 'out_width'}})
        _fix_output_channels(tmp, wrapper(sample).shape[1])
    return path


@contextlib.contextmanager
def _without_native_stdout():
    """Send file descriptor 1 to a discarded file: when the TorchScript exporter fails, PyTorch's
    C++ prints the whole graph there ("Torch IR graph at exception", 1 MB for ESC x4; its ONNX log is
    on whatever ``torch.onnx`` says), past ``sys.stdout``. The failure itself is raised as usual."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _fix_output_channels(path, channels: int) -> None:
    """The traced crop loses the output's static channel count (ONNX names it
    ``Sliceoutput_dim_1``); write it back so that consumers see (N, C, H, W) with C fixed."""
    import onnx

    graph = onnx.load(os.fspath(path))
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = int(channels)
    onnx.save(graph, os.fspath(path))


def verify_onnx(path: str | os.PathLike, model: nn.Module, fp16: bool = False, seed: int = 0) -> list[dict]:
    """Run the ONNX file with onnxruntime (CPU) and the PyTorch model (fp32, as ``Upscaler``
    runs it) on random inputs of sizes other than the traced one (batch 1 and 2, H and W not
    multiples of the window); returns one {'shape', 'max_abs_err'} per input."""
    ort = require_onnx()
    from .inference import Upscaler

    window = int(model.window_size)
    reference = Upscaler(model.float(), 'cpu')
    session = ort.InferenceSession(os.fspath(path), providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(seed)
    results = []
    for shape in ((1, 3, 3 * window, 2 * window + 5), (2, 3, window + window // 2 + 1, 3 * window - 1)):
        x = torch.rand(shape, generator=gen)
        expected = reference.forward(x)
        feed = x.half().numpy() if fp16 else x.numpy()
        got = torch.from_numpy(session.run(None, {'input': feed})[0]).float()
        if got.shape != expected.shape:
            raise ExportError(f'ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)} '
                              f'for input {shape}')
        results.append({'shape': shape, 'max_abs_err': (got - expected).abs().max().item()})
    return results
