"""Training-set preparation: HR images -> sub-images, MATLAB-bicubic LR sub-images, LMDBs.

Follows BasicSR's DIV2K recipe (``extract_subimages`` + ``create_lmdb``): every HR image is cut
into ``crop``x``crop`` sub-images with stride ``step``; a last row/column of patches is added when
the remainder exceeds ``thresh``. Sub-image ``k`` (from 1) of ``0001.png`` is ``0001_s{k:03d}.png``.

The LR sub-images are cut from the bicubic LR of the *whole* image (HR mod-cropped to the scale),
like BasicSR cuts DIV2K's official LR images, so patch borders see their real neighbours. That
needs every patch origin to be a multiple of every scale: ``crop`` and ``step`` must divide by all
scales, and the extra last patch is moved up/left to the nearest such multiple (for DIV2K, whose
sides are multiples of 12, it does not move; if it lands on an existing patch it is dropped).

Output layout under ``out_root`` (what ``options/train_ESC_*.yml`` read)::

    <hr_name>_sub/                      <hr_name>_sub.lmdb
    <lr_name>/X{s}_sub/                 <lr_name>/X{s}_sub.lmdb
    (hr_name = basename of the HR folder, lr_name = hr_name with '_HR' -> '_LR_bicubic')

Every file is written atomically and re-runs skip finished work, so a killed run can simply be
started again (temporary files a killed run left are removed first). The settings that determine
the outputs (input folder, scales, crop, step, thresh, PNG compression) are recorded for every output
folder before anything is written to it (``<x>_sub.prepare.json`` next to a sub-image folder, so the
folder holds nothing but images; ``prepare.json`` inside an LMDB); a re-run with other settings
stops with a :class:`PrepareSettingsError` instead of mixing old and new files. An unreadable image is
skipped with one line naming it; the run finishes the rest and :func:`prepare_dataset` reports the
skipped files (the command then exits with status 1).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from multiprocessing import Pool

import lmdb
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from tqdm import tqdm

from ..fileio import atomic_write_bytes, is_temp_name, remove_stale_temp_files
from ..runtime import die_with_parent
from .image_files import (
    PNG_COMPRESSION,
    ImageReadError,
    bicubic_downscale,
    list_images,
    mod_crop,
    name_clashes,
    png_complete,
    read_image_bgr,
    write_png_atomic,
)
from .lmdb_envs import reading_lmdb


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` did: output folders, counts and the images it had to skip."""
    hr_sub_folder: str
    lr_sub_folders: dict[int, str]
    lmdb_folders: list[str] = field(default_factory=list)
    num_images: int = 0
    num_sub_images: int = 0
    num_written: int = 0
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    removed_temp_files: list[str] = field(default_factory=list)


SETTINGS_SUFFIX = '.prepare.json'  # <folder>.prepare.json next to a sub-image folder
LMDB_SETTINGS_FILE = 'prepare.json'  # inside an LMDB folder: written with the database, renamed with it
SETTINGS_VERSION = 1


class PrepareSettingsError(ValueError):
    """The output folders hold files of an earlier run with other (or unrecorded) settings."""


def patch_origins(length: int, crop: int, step: int, thresh: int, align: int = 1) -> list[int]:
    """Start offsets of the patches along one side (BasicSR's ``extract_subimages`` rule).

    ``align``: every origin must be a multiple of it (the lcm of the scales); the extra last patch
    is moved back to the nearest multiple and dropped when it then coincides with the previous one.
    """
    if length < crop:
        return []
    origins = list(range(0, length - crop + 1, step))
    if length - (origins[-1] + crop) > thresh:
        last = (length - crop) // align * align
        if last > origins[-1]:
            origins.append(last)
    return origins


def dataset_name(hr_folder: str) -> str:
    """The name the outputs are called after: the HR folder's own name, also for ``.`` or ``imgs/``."""
    name = os.path.basename(os.path.abspath(hr_folder))
    if not name:
        raise ValueError(f'cannot name the outputs after {hr_folder}: give a folder below the file-system root')
    return name


def default_out_root(hr_folder: str) -> str:
    """The parent of ``hr_folder`` (relative to the working folder when that is possible)."""
    parent = os.path.dirname(os.path.abspath(hr_folder))
    try:
        relative = os.path.relpath(parent)
    except ValueError:  # another drive (Windows)
        return parent
    return '' if relative == os.curdir else relative  # '' like os.path.dirname: outputs named 'x_sub', not './x_sub'


def output_folders(hr_folder: str, out_root: str, scales) -> tuple[str, dict[int, str]]:
    """HR sub-image folder and LR sub-image folder per scale for ``hr_folder``."""
    hr_name = dataset_name(hr_folder)
    lr_name = hr_name.replace('_HR', '_LR_bicubic') if '_HR' in hr_name else hr_name + '_LR_bicubic'
    hr_sub = os.path.join(out_root, f'{hr_name}_sub')
    lr_subs = {s: os.path.join(out_root, lr_name, f'X{s}_sub') for s in scales}
    return hr_sub, lr_subs


def run_settings(hr_folder: str, scales, crop: int, step: int, thresh: int) -> dict:
    """What determines the output files: recorded in every output folder, compared on a re-run."""
    return {'version': SETTINGS_VERSION, 'input': os.path.realpath(hr_folder), 'scales': sorted(set(scales)),
            'crop': crop, 'step': step, 'thresh': thresh, 'png_compression': PNG_COMPRESSION}


def settings_record(folder: str) -> str:
    """Where the settings of output ``folder`` are recorded."""
    folder = folder.rstrip('/\\')
    if folder.endswith('.lmdb'):
        return os.path.join(folder, LMDB_SETTINGS_FILE)
    return folder + SETTINGS_SUFFIX


def _read_settings(folder: str):
    """The settings recorded for ``folder``: a dict, None when there is no record, or a string saying why it is
    unreadable."""
    path = settings_record(folder)
    try:
        with open(path, encoding='utf-8') as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f'unreadable settings record {path} ({err})'
    return record if isinstance(record, dict) else f'unreadable settings record {path}'


def _settings_differences(recorded: dict, wanted: dict) -> list[str]:
    def show(value):
        return ' '.join(str(v) for v in value) if isinstance(value, list) else str(value)

    return [f'{key} {show(recorded.get(key, "unrecorded"))} before, {show(wanted[key])} now'
            for key in wanted if recorded.get(key) != wanted[key]]


def _holds_files(folder: str) -> bool:
    return os.path.isdir(folder) and any(not is_temp_name(n) for n in os.listdir(folder))


def check_outputs(folders: list[str], settings: dict) -> None:
    """Raise :class:`PrepareSettingsError` when an output folder holds files of a run with other settings
    (or files without a settings record), naming what differs and the folders to delete."""
    conflicts, reason = [], None
    for folder in folders:
        if not _holds_files(folder):
            continue
        recorded = _read_settings(folder)
        if isinstance(recorded, dict):
            differences = _settings_differences(recorded, settings)
            if not differences:
                continue
            why = 'other settings (' + '; '.join(differences) + ')'
        elif recorded is None:
            why = 'unrecorded settings (an older esc-arch, or files from elsewhere)'
        else:
            why = recorded
        conflicts.append(folder)
        reason = reason or f'{folder} holds outputs of an earlier run with {why}'
    if conflicts:
        raise PrepareSettingsError(f'{reason}; not mixing them with this run: give another -o, or delete '
                                   f'{", ".join(conflicts)} to redo them')


def _remove_stale_record_temp_files(folder: str) -> list[str]:
    """Delete the temp files a killed write of ``folder``'s settings record left next to it (only those: the
    parent folder may hold other programs' files)."""
    record = settings_record(folder)
    parent = os.path.dirname(record) or os.curdir
    stem = os.path.splitext(os.path.basename(record))[0]
    return [os.path.join(parent, name) for name in remove_stale_temp_files(parent, stem=stem)]


def _write_settings(folder: str, settings: dict) -> None:
    atomic_write_bytes(settings_record(folder),
                       (json.dumps(settings, indent=1, sort_keys=True) + '\n').encode('utf-8'))


def sub_image_stem(image_name: str) -> str:
    """The key stem of an image: its name without extension, dots replaced (LMDB keys split on '.')."""
    return os.path.splitext(image_name)[0].replace('.', '_')


def _check_unique_stems(names: list[str], hr_folder: str) -> None:
    """Two images whose sub-images would share names (``x.png`` / ``x.jpg``, ``y.b.png`` /
    ``y_b.png``) would write over each other's patches: the HR of one paired with the LR of the other."""
    clashes = name_clashes(names, sub_image_stem)
    if clashes:
        shown = '; '.join(' and '.join(group) for group in clashes[:3])
        more = f' (and {len(clashes) - 3} more)' if len(clashes) > 3 else ''
        raise ValueError(f'images in {hr_folder} would give their sub-images the same names: {shown}{more} '
                         '(names are taken without the extension, dots as underscores); rename or move them')


def _check_settings(scales, crop, step, thresh):
    if not scales:
        raise ValueError('give at least one scale')
    if crop <= 0 or step <= 0 or thresh < 0:
        raise ValueError(f'crop and step must be positive and thresh non-negative, got {crop}, {step}, {thresh}')
    for s in scales:
        if s < 1:
            raise ValueError(f'scales must be positive integers, got {s}')
        if crop % s or step % s:
            raise ValueError(f'crop ({crop}) and step ({step}) must be multiples of every scale; scale {s} does not '
                             'divide them (LR patches must start on whole LR pixels)')


def _process_image(task):
    """Write the missing sub-images of one HR image. Returns (name, stems, written, error, warning)."""
    path, name, hr_sub, lr_subs, crop, step, thresh, align = task
    try:
        import torch
        torch.set_num_threads(1)  # one image per worker; imresize's small matmuls gain nothing from threads
        img = read_image_bgr(path)
        h, w = img.shape[:2]
        ys = patch_origins(h, crop, step, thresh, align)
        xs = patch_origins(w, crop, step, thresh, align)
        if not ys or not xs:
            return name, [], 0, None, f'{path}: {h}x{w} is smaller than the crop size {crop}; no sub-images'
        stem = sub_image_stem(name)
        if not stem.isascii():
            raise ImageReadError(f'cannot use {path}: LMDB keys must be ASCII, rename the file')
        origins = [(y, x) for y in ys for x in xs]
        stems = [f'{stem}_s{k:03d}' for k in range(1, len(origins) + 1)]
        written = 0
        for sub_stem, (y, x) in zip(stems, origins):
            out = os.path.join(hr_sub, sub_stem + '.png')
            if not png_complete(out):
                write_png_atomic(out, img[y:y + crop, x:x + crop])
                written += 1
        for scale, folder in lr_subs.items():
            outs = [os.path.join(folder, sub_stem + '.png') for sub_stem in stems]
            missing = [i for i, out in enumerate(outs) if not png_complete(out)]
            if not missing:
                continue
            low = bicubic_downscale(mod_crop(img, scale), scale)
            size = crop // scale
            for i in missing:
                y, x = origins[i][0] // scale, origins[i][1] // scale
                write_png_atomic(outs[i], low[y:y + size, x:x + size])
                written += 1
        return name, stems, written, None, None
    except ImageReadError as err:
        return name, [], 0, str(err), None


def lmdb_complete(lmdb_path: str, keys: list[str]) -> bool:
    """True when ``lmdb_path`` holds exactly ``keys`` (meta_info.txt and the database agree)."""
    meta = os.path.join(lmdb_path, 'meta_info.txt')
    if not os.path.isfile(meta) or not os.path.isfile(os.path.join(lmdb_path, 'data.mdb')):
        return False
    with open(meta) as f:
        meta_keys = [line.split('.')[0] for line in f if line.strip()]
    if sorted(meta_keys) != sorted(keys):
        return False
    try:
        with reading_lmdb(lmdb_path) as env:  # the environment a data set of this process may have open
            return env.stat()['entries'] == len(keys)
    except lmdb.Error:
        return False


def build_lmdb(folder: str, keys: list[str], settings: dict | None = None) -> bool:
    """Pack ``folder``/<key>.png into ``folder``.lmdb with BasicSR's writer. False when already complete.

    The database (and the ``settings`` record, when given) is written into a temporary folder that
    is renamed into place at the end.
    """
    lmdb_path = folder.rstrip('/\\') + '.lmdb'
    if lmdb_complete(lmdb_path, keys):
        return False
    tmp_path = folder.rstrip('/\\') + '.tmp.lmdb'
    shutil.rmtree(tmp_path, ignore_errors=True)
    names = [k + '.png' for k in keys]
    # Upper bound for PNG-encoded images: raw size plus slack (BasicSR's estimate from the first
    # image alone fails when that image compresses better than the rest).
    raw = sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    map_size = 4 * raw + (64 << 20)
    try:  # its prints name the temporary folder ("Totoal images: ..."); the summary names the LMDB
        with contextlib.redirect_stdout(io.StringIO()):
            make_lmdb_from_imgs(folder, tmp_path, names, keys, map_size=map_size)
    except lmdb.Error as exc:  # e.g. mdb_txn_commit: Input/output error on a full disk
        raise OSError(errno.EIO, f'writing {tmp_path} failed ({exc}); is the disk full?') from exc
    if settings is not None:
        _write_settings(tmp_path, settings)
    if os.path.exists(lmdb_path):
        shutil.rmtree(lmdb_path)
    os.replace(tmp_path, lmdb_path)
    return True


def prepare_dataset(hr_folder: str, out_root: str, scales=(2, 3, 4), crop: int = 480, step: int = 240,
                    thresh: int = 48, workers: int = 1, make_lmdb: bool = True,
                    progress: bool = True) -> PrepareResult:
    """Cut HR sub-images, make bicubic LR sub-images for each scale and pack them into LMDBs.

    Args:
        hr_folder: folder of HR images (e.g. ``datasets/DIV2K/DIV2K_train_HR``).
        out_root: where the outputs go (layout in the module docstring).
        scales: LR scales. crop, step, thresh: sub-image size, stride and the remainder above which
            a last patch is added (BasicSR: 480, 240, 48). workers: processes. make_lmdb: pack LMDBs.
        progress: show tqdm bars.
    """
    scales = sorted(set(int(s) for s in scales))
    _check_settings(scales, crop, step, thresh)
    if os.path.exists(hr_folder) and not os.path.isdir(hr_folder):
        raise ValueError(f'{hr_folder} is a file; give -i the folder that holds the HR images')
    if not os.path.isdir(hr_folder):
        raise FileNotFoundError(f'HR folder {hr_folder} does not exist')
    names = list_images(hr_folder)
    if not names:
        raise FileNotFoundError(f'no images ({", ".join(e[1:] for e in (".png", ".jpg", ".bmp", ".tif"))}, ...) '
                                f'in {hr_folder}')
    _check_unique_stems(names, hr_folder)
    hr_sub, lr_subs = output_folders(hr_folder, out_root, scales)
    sub_folders = [hr_sub, *lr_subs.values()]
    settings = run_settings(hr_folder, scales, crop, step, thresh)
    check_outputs(sub_folders + [f + '.lmdb' for f in sub_folders], settings)
    removed = []
    for folder in sub_folders:
        removed += [os.path.join(folder, n) for n in remove_stale_temp_files(folder)]
        removed += _remove_stale_record_temp_files(folder)
        os.makedirs(folder, exist_ok=True)
        if _read_settings(folder) != settings:
            _write_settings(folder, settings)  # before any image: a killed run is recorded too
    align = math.lcm(*scales)
    result = PrepareResult(hr_sub, lr_subs, num_images=len(names), removed_temp_files=removed)
    tasks = [(os.path.join(hr_folder, n), n, hr_sub, lr_subs, crop, step, thresh, align) for n in names]
    keys = []
    bar = tqdm(total=len(tasks), unit='image', desc='sub-images', disable=not progress)
    workers = min(workers, len(tasks))
    # a killed prepare ends them (its pid: also when it ends before a worker has started)
    pool = Pool(workers, initializer=die_with_parent, initargs=(os.getpid(), )) if workers > 1 else None
    finished = False
    try:
        results = pool.imap_unordered(_process_image, tasks) if pool else map(_process_image, tasks)
        for _name, stems, written, error, warning in results:
            bar.update(1)
            keys.extend(stems)
            result.num_written += written
            if error:
                result.failed.append(error)
                tqdm.write(f'skipped: {error}')
            if warning:
                result.warnings.append(warning)
                tqdm.write(f'warning: {warning}')
        finished = True
    finally:
        bar.close()
        if pool:
            if finished:
                pool.close()
            else:  # Ctrl-C or an error: the images in flight are dropped (their writes are atomic)
                pool.terminate()
            pool.join()
    keys.sort()
    result.num_sub_images = len(keys)
    if make_lmdb and keys:
        for folder in sub_folders:
            build_lmdb(folder, keys, settings)
            result.lmdb_folders.append(folder + '.lmdb')
    return result
