"""Inference with ESC models: image I/O, tiling with feathered blending, precision.

The functions here are a library (the ``basicsr upscale`` command is a thin layer on top):

* :func:`read_image` / :func:`write_image` read and atomically write any image OpenCV reads
  (8/16-bit and float, gray, gray + alpha, BGR, BGRA), turned upright by its EXIF orientation;
* :class:`Upscaler` runs a deployed model on whole images or on overlapping tiles whose
  seams are hidden by linear-ramp weights.
"""
from __future__ import annotations

import io
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from .archs.layers import reflect_pad_to_multiple
from .data.image_files import IMAGE_EXTENSIONS, float_range_problem, imread_quiet, is_tiff
from .fileio import atomic_path

PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# What a full-scale pixel value is for each supported storage type (float images are in [0, 1]).
DTYPE_RANGE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0,
               np.dtype(np.float64): 1.0}
# float pixels beyond [0, 1] by more than this are not an image the models were trained on
FLOAT_SLACK = 0.05
# EXIF orientation -> what turns the stored pixels upright (as PIL's ImageOps.exif_transpose)
_UPRIGHT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1),
}


class InferenceError(ValueError):
    """A user-facing problem: bad device/precision, unreadable image, unwritable output."""


class MissingCodecError(InferenceError):
    """An image whose compression needs a package that is not installed (``reason`` says which)."""

    def __init__(self, path, reason: str):
        super().__init__(f'cannot read image {path}: {reason}')
        self.reason = reason


# --------------------------------------------------------------------------------------
# devices and precision
# --------------------------------------------------------------------------------------
def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/'auto' picks CUDA when available; 'cuda' without CUDA is an error, not a fallback."""
    if name in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InferenceError(f'unknown device {name!r} (use cpu or cuda)') from exc
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InferenceError('device cuda requested but CUDA is not available here (use --device cpu)')
    if device.type not in ('cpu', 'cuda'):
        raise InferenceError(f'unsupported device {name!r} (use cpu or cuda)')
    return device


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InferenceError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    if precision == 'fp16' and device.type != 'cuda':
        raise InferenceError('fp16 needs CUDA; on CPU use --precision bf16 or fp32')
    return PRECISIONS[precision]


# --------------------------------------------------------------------------------------
# image files
# --------------------------------------------------------------------------------------
def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _probe(path: str) -> tuple[str | None, int, str | None, int | None]:
    """PIL's reading of the file's header: (mode, the EXIF orientation still to apply, why the pixel
    data is incomplete or None, a gray image's transparent level or None). OpenCV's
    ``IMREAD_UNCHANGED`` ignores the orientation of JPEG, PNG and WebP files (TIFFs it turns
    itself). JPEGs are decoded to the end, since OpenCV fills a truncated one with gray."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            mode = im.mode
            if im.format == 'PNG' and im.tile and str(im.tile[0][3]).startswith('LA'):
                mode = 'LA'  # a 16-bit gray + alpha PNG, which PIL opens as RGBA (raw mode 'LA;16B')
            orientation = im.getexif().get(0x0112, 1) if im.format in ('JPEG', 'MPO', 'PNG', 'WEBP') else 1
            if im.format == 'JPEG':
                try:
                    im.load()
                except OSError as exc:
                    return mode, 1, str(exc).splitlines()[0], None
            transparent = im.info.get('transparency') if mode in ('1', 'L', 'I', 'I;16', 'I;16B') else None
    except Exception:  # a format PIL does not read (or a huge image): OpenCV's reading stands
        return None, 1, None, None
    transparent = transparent if isinstance(transparent, int) else None
    return mode, orientation if orientation in _UPRIGHT else 1, None, transparent


def _as_read(rgb: np.ndarray, orientation: int) -> tuple[np.ndarray, int]:
    """A fallback reader's result in read_image's layouts: RGB(A) as BGR(A), a known orientation."""
    if rgb.ndim == 3 and rgb.shape[2] in (3, 4):
        rgb = rgb[:, :, [2, 1, 0, 3][:rgb.shape[2]]]
    return np.ascontiguousarray(rgb), orientation if orientation in _UPRIGHT else 1


def _read_tiff(path: str | io.BytesIO) -> tuple[np.ndarray, int] | None:
    """A gray / RGB TIFF's first page through tifffile, which keeps 16-bit colour and float samples
    (PIL reduces 16-bit RGB to 8-bit and does not open float RGB); None for other photometrics and
    what it cannot decode. Its compressions (LZW, Deflate, Zstd, JPEG, ...) come from imagecodecs:
    without it OpenCV's reading of such files is no way out, as it gives wrong pixels for many
    (premultiplied 8-bit RGBA, 16-bit gray + alpha or Zstd RGB as 8-bit, planar samples)."""
    try:
        import tifffile
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            samples = {tifffile.PHOTOMETRIC.MINISBLACK: (1, 2), tifffile.PHOTOMETRIC.RGB: (3, 4)}
            if page.samplesperpixel not in samples.get(page.photometric, ()):
                return None
            try:
                img = page.asarray()
            except ValueError as exc:
                if 'imagecodecs' in str(exc):
                    codec = getattr(page.compression, 'name', page.compression)
                    raise MissingCodecError(path, f'its {codec} compression needs the imagecodecs package '
                                            '(pip install imagecodecs)') from None
                raise
            tag = page.tags.get('Orientation')
            orientation = int(tag.value) if tag is not None else 1
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and img.ndim == 3:
                img = np.moveaxis(img, 0, -1)
    except InferenceError:
        raise
    except Exception:
        return None
    return _as_read(img, orientation)


def _read_with_pil(path: str) -> tuple[np.ndarray, int] | None:
    """What OpenCV could not read, through PIL: (the stored pixels in read_image's layouts, the
    EXIF orientation to apply; PIL's exif_transpose does not transpose 16-bit gray), or None."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            if im.mode not in ('L', 'LA', 'I;16', 'F', 'RGB', 'RGBA'):
                im = im.convert('RGBA' if 'A' in im.getbands() or 'transparency' in im.info else 'RGB')
            img = np.asarray(im)
    except Exception:
        return None
    return _as_read(img, orientation)


def _write_png_gray_alpha16(path: str, img: np.ndarray) -> None:
    """A 16-bit gray + alpha PNG (colour type 4), which neither OpenCV nor PIL writes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    h, w = img.shape[:2]
    rows = np.ascontiguousarray(img.astype('>u2')).view(np.uint8).reshape(h, w * 4)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 on each row
    with open(path, 'wb') as handle:
        handle.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 4, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(raw, 6)) + chunk(b'IEND', b''))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image as stored (``cv2.IMREAD_UNCHANGED``: its bit depth and channels), turned upright by
    its EXIF orientation: HxW, or HxWxC with C = 2 (gray + alpha), 3 (BGR) or 4 (BGRA). Float pixels
    must lie in [0, 1] (up to ``FLOAT_SLACK``)."""
    path = os.fspath(path)
    # TIFFs through tifffile (+ imagecodecs): OpenCV 5 reads samples stored in separate planes,
    # 16-bit gray + alpha and compressed RGBA as wrong pixels, and fails on orientations that transpose
    tiff = _read_tiff(path) if is_tiff(path) else None
    img = None if tiff else imread_quiet(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        fallback = tiff or _read_with_pil(path)  # e.g. a TIFF tifffile cannot decode; gray + alpha as 2 channels
        if fallback is None:
            raise InferenceError(f'cannot read image {path} (corrupt or not a supported image)')
        (img, orientation), mode, incomplete, transparent = fallback, None, None, None
    else:
        mode, orientation, incomplete, transparent = _probe(path)
    if incomplete:
        raise InferenceError(f'cannot read image {path}: {incomplete} (a truncated file?)')
    if img.dtype == np.float16:  # a half-float TIFF: float32 holds it exactly (and is written as such)
        img = img.astype(np.float32)
    if img.dtype not in DTYPE_RANGE:
        raise InferenceError(f'{path}: unsupported pixel type {img.dtype} (8-bit, 16-bit or float only)')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    # gray + alpha, which OpenCV reads as BGRA (PNG) or without its alpha, as it reads a gray image's
    # transparent level (PNG tRNS)
    gray_alpha = mode in ('LA', 'La')
    if gray_alpha and img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, [0, 3]]
    elif (gray_alpha or transparent is not None) and img.ndim == 2 and img.dtype == np.uint8:
        from PIL import Image
        with Image.open(path) as im:
            img = np.asarray(im.convert('LA'))  # PIL maps the transparent level of 1/2/4-bit gray too
    elif transparent is not None and img.ndim == 2:
        img = np.stack([img, np.where(img == transparent, 0, DTYPE_RANGE[img.dtype]).astype(img.dtype)], axis=2)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (2, 3, 4)):
        raise InferenceError(f'{path}: unsupported image layout {img.shape}')
    if img.dtype.kind == 'f' and (problem := float_range_problem(img, FLOAT_SLACK)):
        raise InferenceError(f'{path}: float pixels {problem}; the models take [0, 1] '
                             '(rescale the image, or store it as 8/16-bit)')
    return _upright(img, orientation)


def _upright(img: np.ndarray, orientation: int) -> np.ndarray:
    return np.ascontiguousarray(_UPRIGHT[orientation](img)) if orientation != 1 else img


def read_tiff_bytes(content: bytes) -> np.ndarray | None:
    """A gray / RGB TIFF held in memory (a data set's file, read by BasicSR) as :func:`read_image`
    reads it from a file, upright and as stored (OpenCV decodes planar and some compressed TIFFs to
    wrong pixels); None for what tifffile does not read, which is left to OpenCV."""
    tiff = _read_tiff(io.BytesIO(content))
    return None if tiff is None else _upright(*tiff)


# what each output format stores (OpenCV otherwise converts silently: a float image written as PNG
# comes out black, a 16-bit one as JPEG saturated)
FORMAT_TYPES = {'.png': ('uint8', 'uint16'), '.jpg': ('uint8', ), '.jpeg': ('uint8', ), '.webp': ('uint8', ),
                '.bmp': ('uint8', ), '.ppm': ('uint8', 'uint16'), '.pgm': ('uint8', 'uint16'),
                '.tif': ('uint8', 'uint16', 'float32', 'float64'), '.tiff': ('uint8', 'uint16', 'float32', 'float64')}
_NO_ALPHA = ('.jpg', '.jpeg', '.ppm', '.pgm')
# the longest side each format stores (libjpeg, libwebp); OpenCV fails on more as on a full disk
FORMAT_MAX_SIDE = {'.jpg': 65500, '.jpeg': 65500, '.webp': 16383}


def format_size_problem(suffix: str, height: int, width: int) -> str | None:
    """Why a ``suffix`` file cannot hold a height x width image, or None."""
    most = FORMAT_MAX_SIDE.get(suffix.lower())
    if most is not None and max(height, width) > most:
        return f'{suffix} stores images of at most {most} pixels a side, not {width}x{height}'
    return None


def fit_to_format(img: np.ndarray, suffix: str) -> tuple[np.ndarray, list[str]]:
    """``img`` in what a ``suffix`` file stores, and what was changed: pixels the format cannot hold
    are rounded to its deepest type (16-bit PNG for float, 8-bit JPEG for 16-bit), an alpha it has
    no place for is dropped."""
    suffix = suffix.lower()
    changes = []
    if suffix in _NO_ALPHA and img.ndim == 3 and img.shape[2] in (2, 4):
        img = img[:, :, 0] if img.shape[2] == 2 else img[:, :, :3]
        changes.append(f'{suffix} has no alpha: the alpha is dropped')
    types = FORMAT_TYPES.get(suffix)
    if types and img.dtype.name not in types:
        target = np.dtype(types[-1] if img.dtype.kind == 'f' else types[0])
        img = np.round(np.clip(img.astype(np.float64) / DTYPE_RANGE[img.dtype], 0, 1) * DTYPE_RANGE[target])
        img = img.astype(target)
        changes.append(f'{suffix} stores {" or ".join(types)}: the pixels are rounded to {target}')
    return img, changes


def _gray_alpha_writer(img: np.ndarray, suffix: str):
    """What writes a gray + alpha ``img`` as a ``suffix`` file keeping its two channels, or None
    (OpenCV then writes it as BGRA)."""
    if img.dtype == np.uint8 and suffix in ('.png', '.tif', '.tiff'):
        from PIL import Image
        return lambda tmp, pixels: Image.fromarray(pixels, 'LA').save(tmp)
    if img.dtype == np.uint16 and suffix == '.png':
        return _write_png_gray_alpha16
    if suffix in ('.tif', '.tiff'):  # 16-bit / float: PIL has no such mode
        import tifffile
        return lambda tmp, pixels: tifffile.imwrite(tmp, pixels, photometric='minisblack', extrasamples=['unassalpha'])
    return None


def write_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write atomically: a temp file in the same folder (same extension, so OpenCV picks the
    format), then ``os.replace``; a failed write leaves no partial file behind."""
    path = Path(path)
    types = FORMAT_TYPES.get(path.suffix.lower())
    if types and img.dtype.name not in types:
        raise InferenceError(f'cannot write {path}: {path.suffix} stores {" or ".join(types)} pixels, not '
                             f'{img.dtype} (see fit_to_format)')
    if problem := format_size_problem(path.suffix, *img.shape[:2]):
        raise InferenceError(f'cannot write {path}: {problem}')
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha: OpenCV writes 1, 3 or 4 channels only
        writer = _gray_alpha_writer(img, path.suffix.lower())
        if writer is not None:
            with atomic_path(path, failed_writes=(OSError,)) as tmp:  # the error names path, not tmp
                writer(tmp, np.ascontiguousarray(img))
            return
        img = img[:, :, [0, 0, 0, 1]]  # as BGRA, the gray in all three colours
    try:
        with atomic_path(path) as tmp:
            if not cv2.imwrite(tmp, img):
                raise InferenceError(f'cannot write {path} (OpenCV could not encode {img.dtype} {img.shape} '
                                     f'as {path.suffix}, or not write it: is the disk full?)')
    except cv2.error as exc:
        raise InferenceError(f'cannot write {path}: {exc}'.splitlines()[0]) from exc


def image_to_tensor(img: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
    """(1x3xHxW RGB float in [0, 1], alpha HxW float or None). Gray (HxW or HxWx1) is replicated to 3 channels."""
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or (img.ndim == 3 and not 1 <= img.shape[2] <= 4) \
            or img.dtype not in DTYPE_RANGE:
        raise ValueError(f'an image must be an HxW or HxWxC array with C = 1 (gray), 2 (gray + alpha), 3 (BGR) or 4 '
                         f'(BGRA), of {", ".join(str(np.dtype(t)) for t in DTYPE_RANGE)}; got '
                         f'{getattr(img, "shape", type(img).__name__)} {getattr(img, "dtype", "")}'.rstrip())
    scale = DTYPE_RANGE[img.dtype]
    img = img.astype(np.float32) / scale
    alpha = None
    if img.ndim == 2 or img.shape[2] == 1:
        color = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=2)
    elif img.shape[2] == 2:  # gray + alpha
        color, alpha = np.repeat(img[:, :, :1], 3, axis=2), img[:, :, 1]
    else:
        color = img[:, :, :3]
        if img.shape[2] == 4:
            alpha = img[:, :, 3]
    rgb = np.ascontiguousarray(color[:, :, ::-1])
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).unsqueeze(0), alpha


def tensor_to_image(rgb: torch.Tensor, alpha: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """Inverse of :func:`image_to_tensor` for an upscaled result, in the layout and type of ``like``."""
    color = rgb.squeeze(0).float().clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1]  # BGR
    gray_input = like.ndim == 2 or like.shape[2] in (1, 2)
    if gray_input:
        color = cv2.cvtColor(np.ascontiguousarray(color), cv2.COLOR_BGR2GRAY)[:, :, None]
    channels = [color]
    if alpha is not None:
        channels.append(np.clip(alpha, 0, 1)[:, :, None])
    out = np.concatenate(channels, axis=2) if len(channels) > 1 else color
    if like.ndim == 2:
        out = out[:, :, 0]
    scale = DTYPE_RANGE[like.dtype]
    if like.dtype.kind == 'f':
        return np.ascontiguousarray(out, dtype=like.dtype)
    return np.ascontiguousarray(np.round(out * scale).astype(like.dtype))


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Alpha is upscaled with BasicSR's MATLAB bicubic (constant alpha stays constant)."""
    from basicsr.utils.matlab_functions import imresize
    return np.clip(imresize(alpha.astype(np.float32), scale), 0, 1)


# --------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, step: int) -> list[int]:
    """Starts of tiles of ``tile`` pixels every ``step`` pixels covering ``length``; the last
    tile is cut at the border (it keeps the alignment of its start)."""
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + step)
    return starts


def ramp_weights(start: int, end: int, prev_end: int | None, next_start: int | None, scale: int) -> torch.Tensor:
    """1-D blending weights (output pixels) for a tile [start, end) of the input.

    Over a part of length n shared with a neighbour the weight is 0 for the n/4 pixels next to
    the tile's edge (where its zero-padded convolutions are wrong), rises linearly over the
    middle n/2 and is 1 for the last n/4; the neighbour's weight is the mirror image, so the two
    sum to 1. Elsewhere, and at the image border, the weight is 1.
    """
    weight = torch.ones((end - start) * scale)

    def ramp(n):  # rising part for an overlap of n output pixels
        return ((torch.arange(n) + 0.5 - n / 4) / (n / 2)).clamp(0, 1)

    if prev_end is not None and prev_end > start:
        n = (prev_end - start) * scale
        weight[:n] = torch.minimum(weight[:n], ramp(n))
    if next_start is not None and next_start < end:
        n = (end - next_start) * scale
        weight[-n:] = torch.minimum(weight[-n:], ramp(n).flip(0))
    return weight


class Upscaler:
    """Run an ESC model on images, whole or in overlapping tiles.

    Args:
        model: an ESC-family model (``deploy()`` is called here), or a checkpoint's path
            (``esc_arch.load_model``).
        device: where to run: 'cpu', 'cuda[:N]' or 'auto' / None (CUDA when available).
        precision: 'fp32', 'bf16' (CPU or CUDA) or 'fp16' (CUDA).
        tile: tile side in input pixels (rounded up to a multiple of the window, and to at least
            one window more than the overlap); 0 = whole image.
        tile_overlap: overlap between neighbouring tiles in input pixels (at least this much: tiles
            start on multiples of the window).
        batch: tiles (or same-size images) per forward pass.

    Every forward input is reflect-padded to a multiple of ``model.window_size`` and the output
    cropped back, as in validation. Tiles start on multiples of the window size, so the windows
    of the attention fall where they fall for the whole image and only the tile borders differ;
    those lie in the overlaps, where linear ramps blend them away.
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike, device: str | torch.device | None = 'cpu',
                 precision: str = 'fp32', tile: int = 0, tile_overlap: int = 32, batch: int = 1):
        if isinstance(model, (str, os.PathLike)):
            from .loading import load_model
            model = load_model(model)
        if not (isinstance(model, torch.nn.Module) and hasattr(model, 'deploy')):
            raise TypeError(f'Upscaler takes an ESC-family model or a checkpoint path, got {type(model).__name__}')
        self.device = resolve_device(device)
        self.dtype = check_precision(precision, self.device)
        self.model = model.deploy().to(self.device)
        self.scale = int(model.upscaling_factor)
        self.window = int(model.window_size)
        wrong = [f'{name} must be >= {least}, got {value}' for name, value, least in
                 (('tile', tile, 0), ('tile overlap', tile_overlap, 0), ('batch', batch, 1)) if value < least]
        if wrong:
            raise InferenceError('; '.join(wrong))
        self.tile = math.ceil(tile / self.window) * self.window if tile else 0
        if self.tile:
            # steps are whole windows: a tile less than one window longer than the overlap (or no
            # longer than it) would step by a window and overlap less, or not at all: it grows
            self.tile = max(self.tile, math.ceil(tile_overlap / self.window) * self.window + self.window)
        self.step = (self.tile - tile_overlap) // self.window * self.window if self.tile else 0
        self.tile_overlap = self.tile - self.step if self.tile else 0  # what neighbouring tiles share
        self.batch = batch

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> (N, 3, h*s, w*s) float32 on the CPU, unclamped."""
        h, w = x.shape[-2:]
        weights = next(self.model.parameters())  # a float64 or half input runs as the model's type
        padded = reflect_pad_to_multiple(x.to(self.device, weights.dtype), self.window)
        with self._autocast():
            out = self.model(padded)
        return out[:, :, :h * self.scale, :w * self.scale].float().cpu()

    def tiles(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of every tile of a height x width input (one tile if untiled)."""
        if not self.tile or (height <= self.tile and width <= self.tile):
            return [(0, height, 0, width)]
        ys, xs = tile_starts(height, self.tile, self.step), tile_starts(width, self.tile, self.step)
        return [(y, min(y + self.tile, height), x, min(x + self.tile, width)) for y in ys for x in xs]

    def upscale_tensor(self, x: torch.Tensor, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Upscale (N, 3, H, W) floats in [0, 1] (any float type) -> float32 on the CPU; tiles of all
        N images are batched together."""
        if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] == 3 and x.is_floating_point()):
            got = f'{tuple(x.shape)} {x.dtype}' if isinstance(x, torch.Tensor) else type(x).__name__
            raise InferenceError(f'upscale_tensor takes a float (N, 3, H, W) tensor in [0, 1], got {got} '
                                 '(an image array: upscale_image)')
        n, _, height, width = x.shape
        s = self.scale
        grid = self.tiles(height, width)
        if len(grid) == 1:
            outs = [self.forward(x[i:i + self.batch]) for i in range(0, n, self.batch)]
            if progress:
                progress(n)
            return torch.cat(outs)
        ys = sorted({t[0] for t in grid})
        xs = sorted({t[2] for t in grid})
        y_ends = {y: min(y + self.tile, height) for y in ys}
        x_ends = {x0: min(x0 + self.tile, width) for x0 in xs}

        def weights(starts, ends, start):
            i = starts.index(start)
            prev_end = ends[starts[i - 1]] if i else None
            next_start = starts[i + 1] if i + 1 < len(starts) else None
            return ramp_weights(start, ends[start], prev_end, next_start, s)

        out = torch.zeros(n, 3, height * s, width * s)
        total = torch.zeros(1, 1, height * s, width * s)
        jobs = [(i, t) for t in grid for i in range(n)]
        by_shape: dict[tuple[int, int], list] = {}
        for job in jobs:
            _, (y0, y1, x0, x1) = job
            by_shape.setdefault((y1 - y0, x1 - x0), []).append(job)
        for group in by_shape.values():
            for k in range(0, len(group), self.batch):
                chunk = group[k:k + self.batch]
                batch = torch.stack([x[i, :, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in chunk])
                result = self.forward(batch)
                for (i, (y0, y1, x0, x1)), tile_out in zip(chunk, result):
                    weight = weights(ys, y_ends, y0)[:, None] * weights(xs, x_ends, x0)[None, :]
                    out[i, :, y0 * s:y1 * s, x0 * s:x1 * s] += tile_out * weight
                    if i == 0:
                        total[0, 0, y0 * s:y1 * s, x0 * s:x1 * s] += weight
                if progress:
                    progress(len(chunk))
        return out / total

    def count_steps(self, images: Sequence[np.ndarray]) -> int:
        """How many units ``progress`` will report for :meth:`upscale_images` (tiles or images)."""
        grid = self.tiles(*images[0].shape[:2])
        return len(images) * len(grid)

    def upscale_images(self, images: Sequence[np.ndarray],
                       progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Upscale images of one shape and type (as read by :func:`read_image`), same layout out."""
        tensors, alphas = zip(*(image_to_tensor(img) for img in images))
        rgb = self.upscale_tensor(torch.cat(tensors), progress)
        outs = []
        for i, img in enumerate(images):
            alpha = upscale_alpha(alphas[i], self.scale) if alphas[i] is not None else None
            outs.append(tensor_to_image(rgb[i:i + 1], alpha, img))
        return outs

    def upscale_image(self, image: np.ndarray) -> np.ndarray:
        return self.upscale_images([image])[0]
