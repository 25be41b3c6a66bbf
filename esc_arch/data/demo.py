"""An embedded demo data set, built offline from the sample photographs scikit-image ships.

Layout under ``root`` (default ``datasets/demo``), file names shared between HR and LR::

    train/HR/<name>.png   train/LR_bicubic/X2/<name>.png   .../X3/   .../X4/
    val/HR/<name>.png     val/LR_bicubic/X2/<name>.png     .../X3/   .../X4/

HR images are mod-cropped to 12 (a multiple of 2, 3 and 4) so one HR folder serves every scale;
LR images are MATLAB-style bicubic. The validation images are never training images.
Building is idempotent: a second call finds every file complete and writes nothing.
"""
from __future__ import annotations

import os

import numpy as np

from .image_files import bicubic_downscale, mod_crop, png_complete, write_png_atomic

DEFAULT_DEMO_ROOT = os.path.join('datasets', 'demo')
SCALES = (2, 3, 4)
MOD = 12  # lcm of SCALES

# Names of skimage.data functions that are bundled with scikit-image (no download needed).
# Gray photographs are repeated to 3 channels. The two sets are disjoint.
TRAIN_IMAGES = ('astronaut', 'rocket', 'immunohistochemistry', 'hubble_deep_field', 'camera', 'coins', 'clock',
                'moon', 'grass', 'gravel', 'brick')
VAL_IMAGES = ('chelsea', 'coffee')
SPLITS = {'train': TRAIN_IMAGES, 'val': VAL_IMAGES}


def _load_sample(name: str) -> np.ndarray:
    """A skimage sample as a uint8 HxWx3 BGR array (the order cv2 writes)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name} is {img.dtype}, expected uint8')
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, 2::-1])  # RGB -> BGR (drops an alpha channel if any)


def demo_paths(root: str = DEFAULT_DEMO_ROOT) -> dict:
    """Folders of the demo set: ``{'train': {'HR': ..., 'X2': ...}, 'val': {...}}``."""
    return {split: {'HR': os.path.join(root, split, 'HR'),
                    **{f'X{s}': os.path.join(root, split, 'LR_bicubic', f'X{s}') for s in SCALES}}
            for split in SPLITS}


def _expected_files(root: str):
    paths = demo_paths(root)
    for split, names in SPLITS.items():
        for name in names:
            yield split, name, [os.path.join(folder, name + '.png') for folder in paths[split].values()]


def demo_data_complete(root: str = DEFAULT_DEMO_ROOT) -> bool:
    return all(png_complete(f) for _, _, files in _expected_files(root) for f in files)


def ensure_demo_data(root: str = DEFAULT_DEMO_ROOT, verbose: bool = True) -> dict:
    """Build the demo set under ``root`` unless it is already complete; return :func:`demo_paths`.

    Safe to call before every training run: when all files exist it only checks them.
    """
    paths = demo_paths(root)
    if demo_data_complete(root):
        return paths
    if verbose:
        print(f'Building the demo data set in {root} (scikit-image sample photographs) ...', flush=True)
    for folders in paths.values():
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)
    for _split, name, files in _expected_files(root):
        if all(png_complete(f) for f in files):
            continue
        hr = mod_crop(_load_sample(name), MOD)
        hr_file, lr_files = files[0], files[1:]
        if not png_complete(hr_file):
            write_png_atomic(hr_file, hr)
        for scale, lr_file in zip(SCALES, lr_files):
            if not png_complete(lr_file):
                write_png_atomic(lr_file, bicubic_downscale(hr, scale))
    if verbose:
        print(f'Demo data set ready: {len(TRAIN_IMAGES)} train and {len(VAL_IMAGES)} validation images.', flush=True)
    return paths


def _demo_root_of(path: str) -> str | None:
    """The demo root when ``path`` is one of its folders (``<root>/{train,val}/{HR,LR_bicubic/X<s>}``)."""
    parts = os.path.normpath(path).split(os.sep)
    for depth in (2, 3):
        if len(parts) <= depth:
            continue
        root = os.sep.join(parts[:-depth]) or os.sep
        if os.path.normpath(path) in {os.path.normpath(p) for split in demo_paths(root).values()
                                      for p in split.values()}:
            return root
    return None


def ensure_demo_data_for_options(opt: dict) -> list[str]:
    """Build the demo set for an option dict whose datasets use it; return the roots built/checked.

    A root is used when the options name it (top-level ``demo_root``) or when a dataset's
    ``dataroot_gt``/``dataroot_lq`` is a demo folder under a directory called ``demo``.
    """
    roots = []
    if opt.get('demo_root'):
        roots.append(opt['demo_root'])
    for dataset in (opt.get('datasets') or {}).values():
        for key in ('dataroot_gt', 'dataroot_lq'):
            path = dataset.get(key) if isinstance(dataset, dict) else None
            root = _demo_root_of(path) if isinstance(path, str) else None
            if root and os.path.basename(root) == 'demo' and root not in roots:
                roots.append(root)
    for root in roots:
        ensure_demo_data(root)
    return roots


def validation_psnr(upscale, root: str = DEFAULT_DEMO_ROOT, scale: int = 2, split: str = 'val') -> dict[str, float]:
    """Per-image PSNR (Y channel, crop = scale, BasicSR's ``calculate_psnr``) of ``upscale(lr_bgr_uint8)``."""
    import cv2
    from basicsr.metrics.psnr_ssim import calculate_psnr

    if scale not in SCALES:
        raise ValueError(f'the demo set has LR images for scales {", ".join(map(str, SCALES))} only, not x{scale}')
    paths = ensure_demo_data(root, verbose=False)[split]
    scores = {}
    for name in SPLITS[split]:
        hr = cv2.imread(os.path.join(paths['HR'], name + '.png'), cv2.IMREAD_COLOR)
        lr = cv2.imread(os.path.join(paths[f'X{scale}'], name + '.png'), cv2.IMREAD_COLOR)
        scores[name] = float(calculate_psnr(upscale(lr), hr, crop_border=scale, input_order='HWC',
                                            test_y_channel=True))
    return scores


def bicubic_baseline(root: str = DEFAULT_DEMO_ROOT, scale: int = 4, split: str = 'val') -> dict[str, float]:
    """:func:`validation_psnr` of MATLAB-style bicubic up-scaling (the kernel that made the LR)."""
    from basicsr.utils.matlab_functions import imresize

    def upscale(lr):
        up = imresize(lr.astype(np.float32) / 255.0, scale)
        return np.clip(np.round(up * 255.0), 0, 255).astype(np.uint8)

    return validation_psnr(upscale, root, scale, split)


def model_psnr(checkpoint: str, root: str = DEFAULT_DEMO_ROOT, split: str = 'val') -> tuple[int, dict[str, float]]:
    """(scale, :func:`validation_psnr`) of a trained checkpoint (``params_ema`` preferred), whole-image inference
    with the LR reflect-padded to the window size as in validation."""
    import torch

    from ..inference import Upscaler
    from ..loading import load_model

    model = load_model(checkpoint)
    scale = int(model.upscaling_factor)
    upscaler = Upscaler(model)
    with torch.inference_mode():
        return scale, validation_psnr(upscaler.upscale_image, root, scale, split)
