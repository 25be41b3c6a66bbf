"""``basicsr upscale``: super-resolve an image or a folder of images with an ESC checkpoint."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('-i', '--input', required=True, help='an image file or a folder of images')
    parser.add_argument('-o', '--output', required=True, help='output folder (created if missing)')
    parser.add_argument('-m', '--model', required=True, help='ESC checkpoint (.pth/.pt/.safetensors)')
    parser.add_argument('--tile', type=int, default=512,
                        help='tile side in input pixels, rounded up to a multiple of the window and to at '
                             'least the overlap plus one window; 0 = whole image (default 512)')
    parser.add_argument('--tile-overlap', type=int, default=32,
                        help='overlap between tiles, at least (tiles start on multiples of the window; default 32)')
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='fp32 (default), bf16 (CPU or CUDA) or fp16 (CUDA only)')
    parser.add_argument('--device', default='auto', help='cpu, cuda or auto (default: cuda when available)')
    parser.add_argument('--batch', type=int, default=1, help='tiles or same-size images per forward pass')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
    parser.add_argument('--ext', choices=('auto', 'png', 'jpg', 'webp', 'tif', 'bmp'), default='auto',
                        help="output format: auto keeps each input's (default); png is lossless, 16-bit and "
                             "alpha included (JPEG inputs are not compressed again)")


def _error(message: str) -> None:
    tqdm.write(f'basicsr upscale: error: {message}', file=sys.stderr)


def _warn(message: str) -> None:
    tqdm.write(f'warning: {message}', file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import torch

    import esc_arch
    from esc_arch.data.image_files import IMAGE_EXTENSIONS
    from esc_arch.fileio import is_temp_name
    from esc_arch.inference import (
        InferenceError,
        Upscaler,
        fit_to_format,
        format_size_problem,
        is_image_path,
        read_image,
        resolve_device,
        write_image,
    )
    from esc_arch.loading import CheckpointError
    from esc_arch.runtime import slow_bf16_warning

    source, out_dir = Path(args.input), Path(args.output)
    if not source.exists():
        _error(f'input not found: {source}')
        return 2
    folders = []
    if source.is_dir():
        entries = sorted(source.iterdir())
        # not the temp files an interrupted (killed) atomic write left, e.g. in an earlier run's -o
        files = [p for p in entries if p.is_file() and not is_temp_name(p.name)]
        folders = [p for p in entries if p.is_dir()]
        if out_dir.is_dir():  # this run's own output folder (-o in/x4, run again) is not an input left out
            folders = [p for p in folders if p.resolve() != out_dir.resolve()]
        if not files:
            _error(f'no files in {source}' + (f' (its {len(folders)} subfolder(s) are not searched: give one as -i)'
                                              if folders else ''))
            return 2
        for folder in folders:
            _warn(f'skipping folder {folder}: subfolders are not searched (give it as -i)')
    elif not is_image_path(source):
        _error(f'{source} is not an image by its extension (one of {", ".join(sorted(IMAGE_EXTENSIONS))})')
        return 2
    else:
        files = [source]
    in_dir = source if source.is_dir() else source.parent
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve():
        _error(f'the output folder {out_dir} is the input folder: outputs would replace the inputs')
        return 2
    try:
        device = resolve_device(args.device)
        model = esc_arch.load_model(args.model, device=device)
        upscaler = Upscaler(model, device=device, precision=args.precision, tile=args.tile,
                            tile_overlap=args.tile_overlap, batch=args.batch)
    except (CheckpointError, InferenceError) as exc:
        _error(str(exc))
        return 2
    if upscaler.tile and args.tile_overlap == 0:
        _warn('--tile-overlap 0: each tile is computed without its neighbours, so tile borders show '
              'as seams (the default 32 hides them)')
    if upscaler.dtype == torch.bfloat16 and (warning := slow_bf16_warning(device)):
        _warn(warning)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _error(f'cannot create output folder {out_dir}: {exc.strerror}')
        return 2

    counts = {'done': 0, 'skipped': len(folders), 'failed': 0}  # a skipped subfolder counts as one
    written: dict[Path, Path] = {}  # output -> its input
    said: set[str] = set()
    pending: list[tuple[Path, Path, object]] = []  # same-size images waiting for one batch
    bar = tqdm(total=len(files), unit='img', desc=f'x{upscaler.scale} {model.config["type"]}')

    def flush():
        if not pending:
            return
        images = [img for _, _, img in pending]
        steps = upscaler.count_steps(images)
        tile_bar = tqdm(total=steps, unit='tile', leave=False) if steps > len(images) else None
        try:
            outputs = upscaler.upscale_images(images, progress=tile_bar.update if tile_bar else None)
        except (InferenceError, RuntimeError) as exc:  # e.g. out of memory: report, go on
            for src, _, _ in pending:
                _error(f'{src}: {str(exc).splitlines()[0]}')
            counts['failed'] += len(pending)
            outputs = []
        finally:
            if tile_bar:
                tile_bar.close()
        for (src, dst, _), result in zip(pending, outputs):
            try:
                result, changes = fit_to_format(result, dst.suffix)
                for change in changes:
                    if change not in said:  # once per kind of change, not per image
                        said.add(change)
                        _warn(f'{src} -> {dst.name}: {change} (said once for all such images)')
                write_image(dst, result)
                counts['done'] += 1
            except (InferenceError, OSError) as exc:
                _error(str(exc))
                counts['failed'] += 1
        bar.update(len(pending))
        pending.clear()

    for src in files:
        if not is_image_path(src):
            _warn(f'skipping {src}: not an image (by extension)')
            counts['skipped'] += 1
            bar.update(1)
            continue
        dst = out_dir / (src.name if args.ext == 'auto' else f'{src.stem}.{args.ext}')
        if dst in written:  # photo.jpg and photo.png with --ext png
            _error(f'{src}: its output {dst} is also that of {written[dst]} in this run')
            counts['failed'] += 1
            bar.update(1)
            continue
        written[dst] = src
        if dst.exists() and not args.overwrite:
            _warn(f'skipping {src}: {dst} exists (use --overwrite)')
            counts['skipped'] += 1
            bar.update(1)
            continue
        try:
            image = read_image(src)
            if problem := format_size_problem(dst.suffix, *(side * upscaler.scale for side in image.shape[:2])):
                raise InferenceError(f'{src}: its x{upscaler.scale} output cannot be written: {problem} '
                                     '(use --ext png)')  # said before the forward, not after it
        except InferenceError as exc:
            _error(str(exc))
            counts['failed'] += 1
            bar.update(1)
            continue
        if pending and (len(pending) >= upscaler.batch or (image.shape, image.dtype) !=
                        (pending[0][2].shape, pending[0][2].dtype)):
            flush()
        pending.append((src, dst, image))
    flush()
    bar.close()
    print(f'done: {counts["done"]}, skipped: {counts["skipped"]}, failed: {counts["failed"]} -> {out_dir}')
    return 1 if counts['failed'] else 0
