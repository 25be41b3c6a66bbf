"""Image-file helpers shared by the data preparation and the demo data set.

Reading an image with a clear error, writing a PNG atomically (through esc_arch.fileio), telling
whether a PNG on disk is complete, and MATLAB-style bicubic down-scaling (BasicSR's ``imresize``).
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from basicsr.utils.matlab_functions import imresize

from ..fileio import atomic_write_bytes

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_END = b'IEND\xaeB`\x82'  # the IEND chunk (type + CRC) that closes every PNG
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
PNG_COMPRESSION = 3  # BasicSR's extract_subimages default


class ImageReadError(ValueError):
    """An input image could not be decoded; the message names the file."""


def list_images(folder: str) -> list[str]:
    """Sorted names of the image files directly inside ``folder``."""
    return sorted(name for name in os.listdir(folder)  # hidden names: temporary files of atomic writes
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')
                  and os.path.isfile(os.path.join(folder, name)))


def name_clashes(names, key) -> list[list[str]]:
    """The groups of ``names`` (in their order) that ``key`` maps to one name, e.g. ``x.png`` and
    ``x.jpg`` to the output name ``x``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def imread_quiet(path: str, flags: int):
    """``cv2.imread`` without OpenCV's log lines (a float TIFF read as 8-bit logs a warning before
    failing, a TIFF whose orientation transposes it an internal error): callers say what failed."""
    logging = getattr(getattr(cv2, 'utils', None), 'logging', None)
    if logging is None:
        return cv2.imread(path, flags)
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        return cv2.imread(path, flags)
    finally:
        logging.setLogLevel(level)


def float_range_problem(img: np.ndarray, slack: float = 0.0) -> str | None:
    """Why the pixels of a float image are not in [0, 1] (up to ``slack``), e.g. 'span [0, 248]', or
    None when they are (the convention float images follow; guessing another range would give
    wrong pixels silently)."""
    low, high = float(img.min()), float(img.max())  # NaN and inf show in these
    if not (np.isfinite(low) and np.isfinite(high)):
        return 'include NaN or infinity'
    if low < -slack or high > 1 + slack:
        return f'span [{low:.4g}, {high:.4g}]'
    return None


def _float_to_uint8(img: np.ndarray, path: str) -> np.ndarray:
    """A float image with values in [0, 1] as rounded 8-bit; anything else is refused."""
    problem = float_range_problem(img)
    if problem:
        raise ImageReadError(f'cannot use image {path}: floating-point pixels must lie in [0, 1], these {problem}; '
                             'convert it to an 8- or 16-bit image')
    return np.round(img * 255.0).astype(np.uint8)


TIFF_MAGIC = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')  # classic and BigTIFF, either byte order


def is_tiff(path: str) -> bool:
    try:
        with open(path, 'rb') as handle:
            return handle.read(4) in TIFF_MAGIC
    except OSError:
        return False


def read_image_bgr(path: str) -> np.ndarray:
    """Read an image as uint8 HxWx3 BGR (gray images are repeated to 3 channels, alpha is dropped).

    8-bit and 16-bit images go through OpenCV's colour reader (16-bit is scaled to 8-bit), TIFFs
    through ``inference.read_image`` (OpenCV misreads planar and some compressed ones);
    floating-point images (e.g. float32 TIFF) must hold values in [0, 1] and are rounded to 8-bit.
    """
    if is_tiff(path):
        from ..inference import InferenceError, read_image
        try:
            raw = read_image(path)
        except InferenceError as exc:
            raise ImageReadError(str(exc)) from None
        if raw.ndim == 2 or raw.shape[2] == 2:
            raw = np.repeat((raw if raw.ndim == 2 else raw[:, :, 0])[:, :, None], 3, axis=2)
        raw = raw[:, :, :3]
        if raw.dtype == np.uint16:
            raw = (raw >> 8).astype(np.uint8)  # as OpenCV's colour reader scales 16-bit
        return np.ascontiguousarray(raw if raw.dtype == np.uint8 else _float_to_uint8(raw, path))
    img = imread_quiet(path, cv2.IMREAD_COLOR)
    if img is not None and img.size:
        return img
    raw = imread_quiet(path, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise ImageReadError(f'cannot read image {path}: the file is not a decodable image (corrupt or truncated?)')
    if raw.dtype not in (np.float16, np.float32, np.float64):
        raise ImageReadError(f'cannot use image {path}: its pixel type {raw.dtype} is not supported '
                             '(use 8- or 16-bit integers, or floating point in [0, 1])')
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    if channels not in (1, 3, 4):
        raise ImageReadError(f'cannot use image {path}: {channels} channels are not supported (give gray, BGR '
                             'or BGRA)')
    img = _float_to_uint8(raw.reshape(raw.shape[0], raw.shape[1], channels)[:, :, :3], path)
    return np.ascontiguousarray(np.repeat(img, 3, axis=2) if channels == 1 else img)


def png_complete(path: str) -> bool:
    """True when ``path`` is a PNG written to the end (signature and closing IEND chunk present).

    Our writers are atomic, so this is a cheap guard against files left by other tools or copied
    partially, without decoding every image on a resumed run.
    """
    try:
        size = os.path.getsize(path)
        if size < len(PNG_SIGNATURE) + len(PNG_END):
            return False
        with open(path, 'rb') as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(size - len(PNG_END))
            tail = f.read()
    except OSError:
        return False
    return head == PNG_SIGNATURE and tail == PNG_END


def write_png_atomic(path: str, img: np.ndarray, compression: int = PNG_COMPRESSION) -> None:
    """Encode ``img`` (uint8, HxWxC BGR or HxW) as PNG and write it atomically."""
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError(f'PNG encoding failed for {path}')
    atomic_write_bytes(path, buf.tobytes())


def mod_crop(img: np.ndarray, multiple: int) -> np.ndarray:
    """Crop bottom/right so height and width are multiples of ``multiple``."""
    h, w = img.shape[:2]
    return img[:h - h % multiple, :w - w % multiple]


def bicubic_downscale(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic (antialiased) down-scaling of a uint8 image whose sides divide by ``scale``."""
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f'image size {h}x{w} is not a multiple of scale {scale}; mod-crop it first')
    low = imresize(img.astype(np.float32) / 255.0, 1.0 / scale)
    return np.clip(np.round(low * 255.0), 0, 255).astype(np.uint8)
