"""Read checkpoints and infer which ESC variant (and config) a state dict belongs to."""
from __future__ import annotations

import math
import os
import re
from typing import Mapping

import torch

from .archs import ESC, ESCFP, ESCReal
from .archs.layers import WindowAttention, flashbias_table_shape, is_flashbias, resample_subpixel_conv
from .messages import first_line

ARCHS = {'ESC': ESC, 'ESCFP': ESCFP, 'ESCReal': ESCReal}
WRAPPER_KEYS = ('params_ema', 'params', 'state_dict', 'model')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or fits no ESC variant."""


def read_state_dict(source: str | os.PathLike | Mapping) -> dict:
    """A flat {name: tensor} dict from a path (.pth/.pt/.safetensors) or a (wrapped) dict.

    BasicSR wrappers are unpacked (``params_ema`` first, then ``params``), DDP's ``module.``
    prefix is dropped. Files are read with ``weights_only=True``.
    """
    if isinstance(source, (str, os.PathLike)):
        data = read_checkpoint_file(os.fspath(source))
    else:
        data = source
    if not isinstance(data, Mapping):
        raise CheckpointError(f'a checkpoint must hold a dict of tensors, got {type(data).__name__}')
    if {'iter', 'optimizers', 'schedulers'} <= set(data):
        what = os.fspath(source) if isinstance(source, (str, os.PathLike)) else 'this'
        raise CheckpointError(f'{what} is a BasicSR training state (optimizers and schedulers, '
                              f'for resuming; iteration {data.get("iter")}), not network weights: give the run\'s '
                              f'models/net_g_{data.get("iter")}.pth instead')
    for key in WRAPPER_KEYS:
        if key in data and isinstance(data[key], Mapping):
            data = data[key]
            break
    state_dict = {}
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'checkpoint entry {name!r} is not a tensor ({type(value).__name__}); '
                                  f'expected a state dict or one under {", ".join(WRAPPER_KEYS)}')
        state_dict[name[7:] if name.startswith('module.') else name] = value
    return _strip_common_prefix(state_dict)


def _strip_common_prefix(state_dict: dict) -> dict:
    """Drop a first name component every key shares (e.g. a Lightning module's ``model.``) where
    the keys have no top-level ``proj.weight`` (every ESC variant has one) and get one without it."""
    if not state_dict or 'proj.weight' in state_dict:
        return state_dict
    prefix = next(iter(state_dict)).split('.', 1)[0] + '.'
    if all(name.startswith(prefix) for name in state_dict) and prefix + 'proj.weight' in state_dict:
        return {name[len(prefix):]: value for name, value in state_dict.items()}
    return state_dict


def _file_format(head: bytes) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save) or 'unknown', from the first bytes."""
    if len(head) >= 9 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < 1 << 30:
        return 'safetensors'  # an 8-byte header length, then the JSON header
    if head.startswith(b'PK'):
        return 'zip'
    if head[:1] == b'\x80':
        return 'pickle'
    return 'unknown'


def read_checkpoint_file(path: str):
    """The object a checkpoint file holds, read by its content (whatever its extension), or one
    CheckpointError saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} is a folder: give the .pth or .safetensors file'
                              if os.path.isdir(path) else f'checkpoint not found: {path}')
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
            if not head:
                raise CheckpointError(f'cannot read checkpoint {path}: the file is empty')
            kind = _file_format(head)
            if kind == 'safetensors':
                from safetensors.torch import load_file
                return load_file(path)
            f.seek(0)  # torch.load of the file object: given the path it goes by the name's extension
            return torch.load(f, map_location='cpu', weights_only=True)
    except CheckpointError:
        raise
    except OSError as exc:  # the file cannot be opened or read: permissions, an I/O error
        raise CheckpointError(f'cannot read checkpoint {path}: {exc.strerror or first_line(exc)}') from exc
    except Exception as exc:  # corrupt, truncated or foreign file
        text = str(exc)
        if kind == 'unknown':
            reason = 'not a PyTorch (.pth) or safetensors checkpoint, or a truncated one'
        elif 'Weights only load failed' in text:
            reason = ('it holds pickled Python objects besides tensors (e.g. a whole model saved with '
                      'torch.save(model)); load it in Python and save its state_dict() instead')
        else:
            reason = f'the {"safetensors" if kind == "safetensors" else "PyTorch"} file is truncated or corrupt'
        detail = text.strip().splitlines()[0] if text.strip() else ''
        raise CheckpointError(f'cannot read checkpoint {path}: {reason} ({type(exc).__name__}'
                              f'{": " + detail[:120] if detail and "Weights only" not in detail else ""})') from exc


def _shape(sd: Mapping, key: str, ndim: int) -> tuple:
    """sd[key]'s shape, checked to have ``ndim`` dimensions (KeyError if it is missing)."""
    value = sd[key]
    if value.dim() != ndim:
        raise CheckpointError(f'{key} has shape {tuple(value.shape)}, expected {ndim} dimensions: '
                              'not an ESC checkpoint, or a damaged one')
    return tuple(value.shape)


def _ratio(hidden: int, dim: int) -> float:
    """An expansion ratio r with int(dim * r) == hidden, as the layers compute their widths
    (hidden / dim itself where it round-trips: 1.25 and 2 of the releases do)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _count(state_dict: Mapping, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({int(m.group(1)) for m in map(regex.match, state_dict) if m})


def infer_config(state_dict: Mapping) -> tuple[str, dict]:
    """(arch type, constructor kwargs) inferred from key names and shapes alone."""
    sd = state_dict
    if 'lk_channel' in sd and 'lk_spatial' in sd:
        arch, kernel_size = 'ESCFP', _shape(sd, 'lk_spatial', 4)[-1]
        pdim = _shape(sd, 'lk_channel', 4)[0]
    elif 'plk_filter' in sd:
        arch = 'ESCReal' if 'skip.0.weight' in sd else 'ESC'
        pdim, _, _, kernel_size = _shape(sd, 'plk_filter', 4)
    else:
        raise CheckpointError('not an ESC checkpoint: it has none of plk_filter (ESC, ESC-Real) or '
                              'lk_channel/lk_spatial (ESC-FP); '
                              f'its first keys are {", ".join(list(sd)[:5]) or "(none)"}')
    if 'to_img.init_pos' in sd:  # traiNNer-redux's ESC with a DySample upsampler (use_dysample)
        raise CheckpointError(f'{arch} checkpoint with a DySample upsampler (to_img.init_pos, to_img.offset): that '
                              'variant (use_dysample: true, from the authors\' code and its forks) is not one of '
                              'the released ESC layouts this package builds')
    try:
        dim = _shape(sd, 'proj.weight', 4)[0]
        n_blocks = _count(sd, r'blocks\.(\d+)\.')
        conv_blocks = _count(sd, r'blocks\.0\.pconvs\.(\d+)\.')
        if 'blocks.0.attn.flashbias_q' in sd:  # the authors' FlashBias variants (ESC_FB_*)
            num_heads, tokens, rank = _shape(sd, 'blocks.0.attn.flashbias_q', 3)
            window_size, flashbias = math.isqrt(tokens), dict(attn_type='FlashBias', flashbias_rank=rank)
        else:
            num_heads, table = _shape(sd, 'blocks.0.attn.relative_position_bias', 2)
            window_size, flashbias = (math.isqrt(table) + 1) // 2, {}
        exp_ratio = _ratio(_shape(sd, 'blocks.0.convffns.0.proj.weight', 4)[0], dim)
    except KeyError as exc:
        raise CheckpointError(f'{arch} checkpoint is missing {exc.args[0]!r}, needed to infer its config') from exc
    config = dict(dim=dim, pdim=pdim, kernel_size=kernel_size, n_blocks=n_blocks, conv_blocks=conv_blocks,
                  window_size=window_size, num_heads=num_heads, exp_ratio=exp_ratio, **flashbias)
    if arch == 'ESCReal':
        config['upscaling_factor'] = 4
    else:
        to_img = sd.get('to_img.weight')
        if to_img is None:
            raise CheckpointError(f'{arch} checkpoint is missing to_img.weight, needed to infer its scale')
        config['upscaling_factor'] = math.isqrt(_shape(sd, 'to_img.weight', 4)[0] // 3)
    if arch == 'ESC':
        config['use_ln'] = 'blocks.0.lns.0.weight' in sd
    return arch, config


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping, limit: int = 8) -> str:
    """One message naming missing/unexpected keys and differing shapes (an ESC's or ESC-FP's
    ``to_img`` of another scale is not one: loading re-samples it)."""
    expected = model.state_dict()
    if isinstance(model, (ESC, ESCFP)):
        state_dict = dict(state_dict)
        resample_subpixel_conv(state_dict, '', 3, model.upscaling_factor)
    for name, layer in model.named_modules():  # a FlashBias layer factors a table of its shape as it loads
        prefix = f'{name}.' if name else ''
        if (isinstance(layer, WindowAttention) and layer.flashbias and prefix + 'relative_position_bias' in state_dict
                and prefix + 'flashbias_q' not in state_dict and prefix + 'flashbias_k' not in state_dict):
            expected = {k: v for k, v in expected.items() if k not in (prefix + 'flashbias_q', prefix + 'flashbias_k')}
            expected[prefix + 'relative_position_bias'] = torch.empty(flashbias_table_shape(layer), device='meta')
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
        if items:
            more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
            parts.append(f'{len(items)} {title}: {"; ".join(items[:limit])}{more}')
    return ' | '.join(parts)


def build_from_state_dict(state_dict: Mapping, attn_type: str = 'auto') -> torch.nn.Module:
    """The ESC-family model a plain state dict is of (its arch and config read from the weights'
    names and shapes, as ``infer_config`` does), with the weights loaded strictly; CheckpointError
    naming the differences if they do not fit it."""
    arch, config = infer_config(state_dict)
    if 'flashbias_rank' in config:  # its layout is FlashBias's: the backend is switched after
        model = ARCHS[arch](**config)
        if attn_type.lower() not in ('auto', 'flashbias'):
            model.set_attn_type(attn_type)
    elif is_flashbias(attn_type):  # as set_attn_type: a layout, not a backend; converting is lossy (SVD)
        raise CheckpointError(f'attn_type {attn_type!r}: this {arch} checkpoint has the relative-position table '
                              'layout; FlashBias is a layout of its own: build the model with attn_type FlashBias '
                              'and a flashbias_rank and load this state dict into it (an SVD of each bias)')
    else:
        model = ARCHS[arch](**config, attn_type=attn_type)
    problems = describe_mismatch(model, state_dict)
    if problems:
        raise CheckpointError(f'state dict does not fit {arch}({config}): {problems}')
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model(source, attn_type: str = 'auto', device: str | torch.device = 'cpu', eval: bool = True):
    """Build the right ESC variant for a released or trained checkpoint and load it strictly.

    Args:
        source: path to a ``.pth``/``.pt``/``.safetensors`` file, or a (BasicSR-wrapped) state dict.
        attn_type: attention backend. device: where to put the model. eval: call ``.eval()``.
    Returns:
        the model; ``model.config`` holds the inferred constructor arguments.
    """
    state_dict = read_state_dict(source)
    model = build_from_state_dict(state_dict, attn_type=attn_type)
    model.config = {'type': type(model).__name__, **infer_config(state_dict)[1]}
    model.to(device)
    return model.eval() if eval else model
