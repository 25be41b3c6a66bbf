"""The data sets of an option file, checked before BasicSR builds them.

BasicSR finds a bad image pair in a data loader worker, as a traceback, when it first reads it:
hours into a run for a pair late in the list, or at the first validation. Here every pair it will
read is listed as BasicSR lists them (its own ``paired_paths_from_*`` functions: a folder, a
``meta_info_file`` with ``filename_tmpl``, or two LMDBs), and each image's size is read from its
header (an LMDB's from its ``meta_info.txt``), so a file that is not an image, a pair that is not
``scale`` apart or smaller than ``gt_size``, and a missing option are one line before the run.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from os import path as osp

from ..data.image_files import list_images, name_clashes
from ..data.lmdb_envs import reading_lmdb
from ..messages import OptionError, first_line

PAIRED_TYPES = ('PairedImageDataset', 'RealESRGANPairedDataset')  # GT + LQ pairs, BasicSR's pairing
OWN_LISTS = ('RealESRGANDataset', 'RealESRGANPairedDataset')  # read the images their meta_info lists
GT_ONLY = ('RealESRGANDataset', 'FFHQDataset')  # give no LQ images (a real-world model degrades the GT)
# options BasicSR's data sets read with opt[key] (a KeyError without them): always, and for training
REQUIRED = {'PairedImageDataset': (('dataroot_gt', 'dataroot_lq', 'io_backend'), ('gt_size', 'use_hflip', 'use_rot')),
            'RealESRGANPairedDataset': (('dataroot_gt', 'dataroot_lq', 'io_backend'),
                                        ('gt_size', 'use_hflip', 'use_rot')),
            'SingleImageDataset': (('dataroot_lq', 'io_backend'), ()),
            # its degradation kernels (read in __init__ and by the loader's workers)
            'RealESRGANDataset': (('dataroot_gt', 'io_backend'), tuple(
                f'{key}{order}' for order in ('', '2') for key in ('blur_kernel_size', 'kernel_list', 'kernel_prob',
                                                                   'blur_sigma', 'betag_range', 'betap_range',
                                                                   'sinc_prob')) + ('final_sinc_prob', 'use_hflip',
                                                                                    'use_rot'))}
MANY_PAIRS = 2000  # reading more image headers than this takes a moment: say so


def is_whole(value, least: int) -> bool:
    """A whole number (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _file_names(folder: str) -> set:
    """The files BasicSR's paired folders pair up (its scandir: every non-hidden file)."""
    return {entry.name for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith('.')}


def require_keys(keys, given: dict, what, where: str, others=None) -> None:
    """OptionError naming the ``keys`` missing from ``given``, each with the given key it may be a typo of."""
    missing = [key for key in keys if key not in given]
    if missing:
        others = {str(k).lower(): k for k in (given if others is None else others) if k not in keys}  # any case
        hints = [f'{key} (did you mean {others[close[0]]}?)' if (close := difflib.get_close_matches(key, others, n=1))
                 else key for key in missing]
        raise OptionError(f'{what} needs the option(s) {", ".join(hints)} ({where})')


def check_loader_settings(dataset: dict, where: str) -> None:
    """What BasicSR's training loader reads and PyTorch / BasicSR only refuse once it is built."""
    workers = dataset.get('num_worker_per_gpu', 0)
    if not is_whole(workers, 0):
        raise OptionError(f'num_worker_per_gpu must be a whole number >= 0, got {workers!r} ({where})')
    prefetch = dataset.get('prefetch_mode')
    if prefetch not in (None, 'cpu', 'cuda'):
        raise OptionError(f'prefetch_mode must be cpu, cuda or empty, got {prefetch!r} ({where})')
    batch = dataset.get('batch_size_per_gpu')
    if not is_whole(batch, 1):
        raise OptionError(f'batch_size_per_gpu must be a whole number >= 1, got {batch!r} ({where})')
    ratio = dataset.get('dataset_enlarge_ratio', 1)
    if not is_whole(ratio, 1):
        raise OptionError(f'dataset_enlarge_ratio must be a whole number >= 1, got {ratio!r} ({where})')


def check_required_keys(phase: str, dataset: dict, opt: dict, where: str) -> None:
    """The options BasicSR's data set reads without a default, with a hint for a misspelt one, and
    the types of those that would fail (or be taken as true) deep inside a worker."""
    always, for_training = REQUIRED.get(dataset.get('type'), ((), ()))
    always = ('name', *always)  # BasicSR's build_dataset logs every data set by its name (a KeyError after set-up)
    training = phase.startswith('train')
    require_keys(always + for_training * training, dataset, dataset.get('type'), where,
                 others=[k for k in dataset if k not in always + for_training])
    if not isinstance(dataset.get('io_backend', {}), dict):
        raise OptionError(f'io_backend must be a mapping such as {{type: disk}}, '
                          f'got {dataset["io_backend"]!r} ({where})')
    for key in ('use_hflip', 'use_rot', 'use_shuffle'):
        if key in dataset and not isinstance(dataset[key], bool) and dataset[key] is not None:
            raise OptionError(f'{key} must be true or false, got {dataset[key]!r} ({where})')
    patch, scale = dataset.get('gt_size'), opt.get('scale')
    if training and dataset.get('type') in PAIRED_TYPES:
        if not is_whole(patch, 1):
            raise OptionError(f'gt_size must be a whole number of pixels, got {patch!r} ({where})')
        if is_whole(scale, 1) and patch % scale:
            raise OptionError(f'gt_size {patch} is not a multiple of scale {scale}: its LQ patch would be '
                              f'{patch / scale:g} pixels ({where})')


def _orientation(image) -> int | None:
    """The EXIF orientation still to apply to PIL's size, from the header alone (PIL's getexif()
    decodes a whole PNG to look for it: 3 ms against 0.1 ms an image). A TIFF's size PIL reports
    turned already."""
    from PIL import Image
    raw = image.info.get('exif') if image.format != 'TIFF' else None
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(0x0112)


def _image_size(path: str) -> tuple[int, int] | str:
    """(height, width) from the file's header, or why it is not an image BasicSR can read."""
    from PIL import Image
    try:
        if os.path.getsize(path) == 0:
            return 'it is empty (0 bytes)'
        with Image.open(path) as image:
            width, height = image.size
            # BasicSR decodes with OpenCV's IMREAD_COLOR, which turns the image by its EXIF orientation
            return (width, height) if _orientation(image) in (5, 6, 7, 8) else (height, width)
    except OSError as exc:
        if not osp.isfile(path):
            return 'it does not exist'
        reason = first_line(exc)
    except Exception as exc:  # PIL's own decoders raise a few other types
        reason = first_line(exc)
    import cv2  # what PIL does not know (e.g. OpenCV-only formats): decode it as BasicSR will
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return image.shape[:2] if image is not None else f'neither PIL nor OpenCV can read it as an image ({reason})'


def _header_sizes(paths: list[str], where: str) -> dict[str, tuple[int, int]]:
    if len(paths) > MANY_PAIRS:  # ~0.25 ms an image once cached (3000 pairs of PNGs: 1.5 s)
        print(f'Checking the headers of {len(paths)} images ({where}) ...', flush=True)
    with ThreadPoolExecutor(8) as pool:  # file system latency, not CPU: threads overlap it
        sizes = dict(zip(paths, pool.map(_image_size, paths)))
    for path in paths:
        if isinstance(sizes[path], str):
            raise OptionError(f'cannot use {path}: {sizes[path]} ({where})')
    return sizes


def _lmdb_meta(folder: str, where: str) -> str:
    """The path of an LMDB's meta_info.txt, the list BasicSR reads its keys from."""
    meta = osp.join(folder, 'meta_info.txt')
    if not osp.isfile(meta):
        raise OptionError(f'{folder} has no meta_info.txt, so it is not an LMDB BasicSR can read '
                          f'(make one with basicsr prepare) ({where})')
    return meta


def _lmdb_sizes(folder: str, where: str) -> dict[str, tuple[int, int]]:
    """Key -> (height, width) from an LMDB's meta_info.txt (``name.png (h,w,c) level`` lines; the key
    is the name up to its first dot, as BasicSR takes it)."""
    meta = _lmdb_meta(folder, where)
    sizes = {}
    # BasicSR keys every line, a blank one too (a key '\n' the LMDB does not hold: None read, a TypeError)
    for number, line in enumerate(_listed_lines(meta, 'the LMDB list', where), 1):
        name, _, rest = line.strip().rpartition(' (')  # from the right: names may hold spaces
        try:
            height, width = (int(v) for v in rest.split(')')[0].split(',')[:2])
        except ValueError:
            raise OptionError(f'{meta}, line {number}: expected "name.png (h,w,c) level", got {line.strip()!r} '
                              f'({where})') from None
        sizes[name.split('.')[0]] = (height, width)
    return sizes


def _check_lmdb_database(folder: str, keys, where: str) -> None:
    """The database of the LMDB ``folder`` opens, is whole and holds every key its meta_info.txt lists.
    BasicSR opens it in the first read and reads each key as it comes: a missing data.mdb was an
    lmdb.Error, a truncated one a bus error (the process killed without a word), a key it does not
    hold a TypeError (BasicSR's get returns None)."""
    import lmdb
    data = osp.join(folder, 'data.mdb')
    if not osp.isfile(data):
        raise OptionError(f'{folder} has no data.mdb, so it is not an LMDB BasicSR can read '
                          f'(make one with basicsr prepare) ({where})')
    with contextlib.ExitStack() as stack:
        try:
            env = stack.enter_context(reading_lmdb(folder))
        except lmdb.Error as exc:
            raise OptionError(f'cannot open the LMDB {folder}: {first_line(exc)} ({where})') from None
        # the meta pages say how long the file is: reading past its end is a bus error
        needed, size = (env.info()['last_pgno'] + 1) * env.stat()['psize'], osp.getsize(data)
        if size < needed:
            raise OptionError(f'{data} is truncated ({size} of its {needed} bytes): copy or make it again ({where})')
        with env.begin() as txn:
            held = set(txn.cursor().iternext(keys=True, values=False))
    missing = [key for key in keys if key.encode('ascii', 'replace') not in held]  # BasicSR's keys are ASCII
    if missing:
        raise OptionError(f'{len(missing)} of the {len(keys)} key(s) meta_info.txt lists are not in the LMDB '
                          f'{folder}, e.g. {missing[0]!r} ({where})')


def _template_hint(gt_dir: str, lq_dir: str, template: str) -> str:
    """'; filename_tmpl '{}x4' pairs them' when the LQ files are named as the GT files plus one
    suffix (``baby.png`` and ``babyx4.png``, the benchmark packs' naming), and the template is another."""
    gt = sorted(osp.splitext(name) for name in _file_names(gt_dir))
    lq = _file_names(lq_dir)
    if not gt:
        return ''
    stem, ext = gt[0]
    suffixes = {osp.splitext(name)[0][len(stem):] for name in lq if name.startswith(stem) and name.endswith(ext)}
    for suffix in sorted(suffixes, key=len):
        fits = '{}' + suffix
        if fits != template and '{' not in suffix and all(f'{g}{suffix}{e}' in lq for g, e in gt):
            return f"; filename_tmpl '{fits}' pairs them"
    return ''


def _pairs_on_disk(dataset: dict, gt_dir: str, lq_dir: str, where: str) -> list[tuple[str, str, str]]:
    """(name, GT path, LQ path) of every pair BasicSR's data set will read from disk."""
    from basicsr.data.data_util import paired_paths_from_folder, paired_paths_from_meta_info_file
    template = dataset.get('filename_tmpl', '{}')
    meta = dataset.get('meta_info_file') if dataset.get('type') == 'PairedImageDataset' else None
    if not meta and template == '{}':
        unpaired = sorted(_file_names(gt_dir) ^ _file_names(lq_dir))
        if unpaired:
            raise OptionError(f'{len(unpaired)} file(s) in only one of {dataset["dataroot_gt"]} and '
                              f'{dataset["dataroot_lq"]}: {", ".join(unpaired[:5])} ({where}); '
                              f'GT and LQ files pair by name{_template_hint(gt_dir, lq_dir, template)}')
    if meta:
        _listed_lines(meta, 'meta_info_file', where)  # a blank line pairs the folders themselves
    try:
        if meta:
            paths = paired_paths_from_meta_info_file([lq_dir, gt_dir], ['lq', 'gt'], osp.expanduser(meta), template)
        else:
            paths = paired_paths_from_folder([lq_dir, gt_dir], ['lq', 'gt'], template)
    except (AssertionError, ValueError, IndexError, KeyError, OSError) as exc:
        source = f'meta_info_file {meta}' if meta else f'{dataset["dataroot_gt"]} and {dataset["dataroot_lq"]}'
        hint = '' if meta else _template_hint(gt_dir, lq_dir, template)
        raise OptionError(f'cannot pair {source} with filename_tmpl {template!r}: {first_line(exc)} '
                          f'({where}){hint}') from None
    if not paths:
        raise OptionError(f'{f"meta_info_file {meta}" if meta else dataset["dataroot_gt"]} lists no images ({where})')
    return sorted((osp.basename(p['gt_path']), p['gt_path'], p['lq_path']) for p in paths)


def _check_pair_sizes(pairs, sizes_gt, sizes_lq, phase: str, dataset: dict, scale, where: str) -> None:
    training = phase.startswith('train')
    patch = dataset.get('gt_size')
    wrong, small = [], []
    for name, gt_key, lq_key in pairs:
        gt, lq = sizes_gt[gt_key], sizes_lq[lq_key]
        # training pairs must be exact; validation/test crop a GT up to scale - 1 pixels larger
        if is_whole(scale, 1) and any(g != q * scale if training else not q * scale <= g < (q + 1) * scale
                                       for g, q in zip(gt, lq)):
            wrong.append(f'{name}: GT {gt[1]}x{gt[0]} is not x{scale} its LQ {lq[1]}x{lq[0]}')
        elif training and is_whole(patch, 1) and patch > min(gt):
            small.append(f'{name} ({gt[1]}x{gt[0]})')
    if wrong:
        many = f' (and {len(wrong) - 1} more of the {len(pairs)} pairs)' if len(wrong) > 1 else ''
        raise OptionError(f'{wrong[0]}{many} ({where}; scale is {scale})')
    if small:
        many = f' and {len(small) - 1} more of the {len(pairs)} pairs' if len(small) > 1 else ''
        raise OptionError(f'gt_size {patch} is larger than {small[0]}{many} ({where})')


def _check_batch(count: int, dataset: dict, where: str, world: int) -> None:
    """Each of the world's processes gets ceil(samples / world) samples (BasicSR's EnlargedSampler)
    and its loader drops a partial batch: fewer than a batch trains nothing."""
    batch = dataset.get('batch_size_per_gpu')
    if is_whole(batch, 1):
        available = math.ceil(count * (dataset.get('dataset_enlarge_ratio') or 1) / world)
        if available < batch:
            per = f' per process ({world} processes)' if world > 1 else ''
            raise OptionError(f'{count} training image(s) x dataset_enlarge_ratio make '
                              f'{available} sample(s){per}, fewer than batch_size_per_gpu {batch} ({where})')


def _warn_shared_output_names(lq_paths: list[str], where: str) -> None:
    """BasicSR saves an output as <LQ name without extension>_<suffix>.png: a1.png and a1.jpg write
    one file (the metrics still count both)."""
    shared = name_clashes([osp.basename(path) for path in lq_paths], lambda name: osp.splitext(name)[0])
    if shared:
        print(f'warning: {" and ".join(shared[0])}{f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""} '
              f'save to one output image, the last written kept ({where}; BasicSR names outputs by the name '
              'without its extension)', file=sys.stderr)


NIQE_BLOCK = 96  # BasicSR's NIQE fits its model to 96x96 blocks: with one block it fails (SVD), none (min())
SSIM_WINDOW = 11  # BasicSR's SSIM keeps the 'valid' part of its 11x11 Gaussian filtering


def _metric_size_problem(kind, height: int, width: int) -> str | None:
    """What an output of ``height`` x ``width`` (after ``crop_border``) lacks for the metric ``kind``:
    NIQE fails with fewer than two blocks; PSNR and SSIM score nothing, silently, as nan (with one
    such image the validation's mean too, and the best is then '-inf @ -1 iter')."""
    if kind == 'calculate_niqe':
        enough = (height // NIQE_BLOCK) * (width // NIQE_BLOCK) >= 2
        return None if enough else f'needs outputs with two {NIQE_BLOCK}x{NIQE_BLOCK} blocks or more'
    least = {'calculate_psnr': 1, 'calculate_ssim': SSIM_WINDOW}.get(kind)
    if least and min(height, width) < least:
        return f'needs outputs of {least}x{least} pixels or more (a smaller one scores nan)'
    return None


def _check_metric_sizes(opt: dict, lq_sizes, where: str) -> None:
    """A metric on an output too small for it (after ``crop_border``) fails or scores nan at the first
    validation, after training has run: the smallest is named here."""
    metrics = (opt.get('val') or {}).get('metrics') or {}
    scale = opt.get('scale') if is_whole(opt.get('scale'), 1) else 1
    for name, metric in metrics.items():
        if not isinstance(metric, dict):
            continue
        crop = metric.get('crop_border', 0) if is_whole(metric.get('crop_border', 0), 0) else 0
        for path, (height, width) in lq_sizes:
            out_h, out_w = height * scale - 2 * crop, width * scale - 2 * crop
            problem = _metric_size_problem(metric.get('type'), out_h, out_w)
            if problem:
                raise OptionError(f'val.metrics.{name} ({metric["type"]}) {problem} after crop_border {crop}; '
                                  f'{path} gives {max(out_h, 0)}x{max(out_w, 0)} ({where})')


def check_images(opt: dict, phase: str, dataset: dict, opt_path: str, world: int = 1) -> None:
    """Every GT/LQ pair (or LQ image) the data set will read: readable, x scale, at least gt_size,
    and enough of them for a training batch."""
    where = f'datasets.{phase} in {opt_path}'
    backend = (dataset.get('io_backend') or {}).get('type', 'disk')
    kind = dataset.get('type')
    folders = {key: osp.expanduser(dataset[key]) for key in ('dataroot_gt', 'dataroot_lq')
               if isinstance(dataset.get(key), str)}
    if backend == 'disk':
        for key, folder in folders.items():
            # a data set reading its own list (meta_info) may read images in subfolders: the list is checked
            own = dataset.get('meta_info_file') or (kind in OWN_LISTS and dataset.get('meta_info'))
            if osp.isdir(folder) and not own and not list_images(folder):
                hint = '; an LMDB needs io_backend: {type: lmdb}' if folder.rstrip('/').endswith('.lmdb') else ''
                raise OptionError(f'no images in {dataset[key]} ({key} of {where}{hint})')
    # "gt, lq" lines of its own (on disk: on LMDBs BasicSR reads their pairs, the meta_info unread)
    own_list = kind == 'RealESRGANPairedDataset' and backend == 'disk' and dataset.get('meta_info')
    if kind in PAIRED_TYPES and len(folders) == 2 and backend in ('disk', 'lmdb') and not own_list:
        if backend == 'lmdb':
            if not all(folder.rstrip('/').endswith('.lmdb') for folder in folders.values()):
                raise OptionError(f'with io_backend lmdb both dataroot_gt and dataroot_lq must be .lmdb folders, '
                                  f'got {dataset["dataroot_gt"]} and {dataset["dataroot_lq"]} ({where})')
            sizes_gt, sizes_lq = (_lmdb_sizes(folders[key], where) for key in ('dataroot_gt', 'dataroot_lq'))
            if set(sizes_gt) != set(sizes_lq):
                only = sorted(set(sizes_gt) ^ set(sizes_lq))
                raise OptionError(f'{len(only)} key(s) in only one of the two LMDBs, e.g. {only[0]} ({where}); '
                                  'they must hold the same images')
            for key, sizes in (('dataroot_gt', sizes_gt), ('dataroot_lq', sizes_lq)):
                _check_lmdb_database(folders[key], list(sizes), where)
            pairs = [(key, key, key) for key in sorted(sizes_gt)]
        else:
            pairs = _pairs_on_disk(dataset, folders['dataroot_gt'], folders['dataroot_lq'], where)
            sizes = _header_sizes([path for _, gt, lq in pairs for path in (gt, lq)], where)
            sizes_gt = sizes_lq = sizes
        _check_pair_sizes(pairs, sizes_gt, sizes_lq, phase, dataset, opt.get('scale'), where)
        if phase.startswith('train'):
            _check_batch(len(pairs), dataset, where, world)
        else:
            _check_metric_sizes(opt, [(lq, sizes_lq[lq]) for _, _, lq in pairs], where)
            if (opt.get('val') or {}).get('save_img'):
                _warn_shared_output_names([lq for _, _, lq in pairs], where)
    elif kind == 'SingleImageDataset' and backend == 'disk' and osp.isdir(folders.get('dataroot_lq', '')):
        meta = dataset.get('meta_info_file')
        if meta:
            names = [line.rstrip().split(' ')[0] for line in _listed_lines(meta, 'meta_info_file', where)]
        else:
            names = sorted(_file_names(folders['dataroot_lq']))
        paths = [osp.join(folders['dataroot_lq'], name) for name in names]
        sizes = _header_sizes(paths, where)
        if not phase.startswith('train'):
            _check_metric_sizes(opt, [(path, sizes[path]) for path in paths], where)
            if (opt.get('val') or {}).get('save_img'):
                _warn_shared_output_names(paths, where)


def _listed_lines(meta: str, what: str, where: str) -> list[str]:
    """The lines of a data set's own list of images; a blank one (BasicSR reads it as the folder
    itself) is refused."""
    with open(osp.expanduser(meta), encoding='utf-8', errors='replace') as handle:
        lines = handle.read().splitlines()
    blank = next((number for number, line in enumerate(lines, 1) if not line.strip()), None)
    if blank is not None:
        raise OptionError(f'{what} {meta}, line {blank}: a blank line, which BasicSR reads as an image path '
                          f'({where})')
    if not lines:
        raise OptionError(f'{what} {meta} lists no images ({where})')
    return lines


def _require_listed(listed: list[str], root: str, meta: str, where: str) -> None:
    missing = [name for name in listed if not osp.isfile(osp.join(root, name))]
    if missing:
        raise OptionError(f'meta_info {meta}: {len(missing)} of its {len(listed)} image(s) are not in {root}, '
                          f'e.g. {missing[0]} ({where})')


def check_meta_info_list(phase: str, dataset: dict, opt_path: str, world: int = 1) -> None:
    """The real-world data sets' own lists: RealESRGANDataset reads its GT images from ``meta_info``
    (one path per line, relative to ``dataroot_gt``; an LMDB's own meta_info.txt), and
    RealESRGANPairedDataset on disk its pairs from ``meta_info`` when given ("gt, lq" lines,
    relative to ``dataroot_gt`` / ``dataroot_lq``). BasicSR fails on a missing key (KeyError), path
    or malformed line, and trains nothing from fewer images than a batch."""
    kind = dataset.get('type')
    where = f'datasets.{phase} in {opt_path}'
    backend = (dataset.get('io_backend') or {}).get('type', 'disk')
    root = osp.expanduser(str(dataset.get('dataroot_gt')))
    meta = dataset.get('meta_info')
    if kind == 'RealESRGANPairedDataset' and backend == 'disk' and meta is not None:
        if not isinstance(meta, str):
            raise OptionError(f'meta_info must be the path of a text file of "gt, lq" lines, got {meta!r} ({where})')
        pairs = []
        for number, line in enumerate(_listed_lines(meta, 'meta_info', where), 1):
            pair = line.strip().split(', ')
            if len(pair) != 2:
                raise OptionError(f'meta_info {meta}, line {number}: expected "gt_path, lq_path" (split at ", "), '
                                  f'got {line.strip()!r} ({where})')
            pairs.append(pair)
        _require_listed([gt for gt, _ in pairs], root, meta, where)
        _require_listed([lq for _, lq in pairs], osp.expanduser(str(dataset.get('dataroot_lq'))), meta, where)
        count = len(pairs)
    elif kind != 'RealESRGANDataset':
        return
    elif backend == 'lmdb':  # BasicSR takes each line's name up to its first dot as a key: no sizes needed
        meta = _lmdb_meta(root, where)
        lines = _listed_lines(meta, 'the LMDB list', where)
        bad = next(((n, line) for n, line in enumerate(lines, 1) if '.' not in line or not line.split('.')[0]), None)
        if bad:  # a line with no dot, or none before it, is a key the LMDB does not hold
            raise OptionError(f'{meta}, line {bad[0]}: expected "name.png ...", got {bad[1]!r}: '
                              f'RealESRGANDataset reads the name up to its first dot as a key ({where})')
        _check_lmdb_database(root, [line.split('.')[0] for line in lines], where)
        count = len(lines)
    elif backend == 'disk':
        if not isinstance(meta, str):
            raise OptionError(f'RealESRGANDataset on disk needs meta_info: a text file listing its GT images, one '
                              f'path per line relative to dataroot_gt ({where})')
        listed = [line.strip().split(' ')[0] for line in _listed_lines(meta, 'meta_info', where)]
        _require_listed(listed, root, meta, where)
        count = len(listed)
    else:
        return
    if phase.startswith('train'):
        _check_batch(count, dataset, where, world)
