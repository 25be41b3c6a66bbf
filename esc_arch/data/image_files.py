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


def read_image_bgr(path: str) -> np.ndarray:
    """Read an 8-bit image as HxWx3 BGR (gray images are repeated to 3 channels)."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ImageReadError(f'cannot read image {path}: the file is not a decodable image (corrupt or truncated?)')
    return img


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
