"""``basicsr prepare``: HR folder -> sub-images, bicubic LR, LMDB; or build the embedded demo set."""
from __future__ import annotations

import os
import sys


def add_arguments(parser):
    parser.add_argument('-i', '--input', help='folder of HR images, e.g. datasets/DIV2K/DIV2K_train_HR')
    parser.add_argument('-o', '--output', default=None,
                        help='output root (default: the parent of --input; with --demo: datasets/demo)')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4], help='LR scales (default: 2 3 4)')
    parser.add_argument('--crop', type=int, default=480, help='sub-image size (default 480)')
    parser.add_argument('--step', type=int, default=240, help='sub-image stride (default 240)')
    parser.add_argument('--thresh', type=int, default=48,
                        help='add a last patch when the remainder exceeds this (default 48)')
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help='processes')
    parser.add_argument('--no-lmdb', action='store_true', help='stop after the PNG sub-images')
    parser.add_argument('--demo', action='store_true',
                        help='build the embedded demo data set (scikit-image photographs) instead')
    parser.add_argument('--report-bicubic', action='store_true',
                        help='with --demo: print the bicubic PSNR (Y, crop = scale) of the validation images')
    parser.add_argument('--report-model', metavar='CHECKPOINT',
                        help='with --demo: print the PSNR of a trained checkpoint on the validation images, next to '
                             'bicubic at its scale (e.g. experiments/train_ESC_demo/models/net_g_latest.pth)')


def _print_scores(label: str, scores: dict) -> None:
    per_image = ', '.join(f'{name} {psnr:.2f}' for name, psnr in scores.items())
    print(f'{label} PSNR-Y (dB): {per_image}; mean {sum(scores.values()) / len(scores):.2f}')


def run(args) -> int:
    import esc_arch  # noqa: F401  (before basicsr)

    if args.demo:
        from esc_arch.data.demo import DEFAULT_DEMO_ROOT, bicubic_baseline, ensure_demo_data
        root = args.output or DEFAULT_DEMO_ROOT
        paths = ensure_demo_data(root)
        print(f'train: {paths["train"]["HR"]}  val: {paths["val"]["HR"]}  (LR in .../LR_bicubic/X2, X3, X4)')
        if args.report_bicubic:
            for scale in args.scales:
                _print_scores(f'bicubic x{scale}', bicubic_baseline(root, scale))
        if args.report_model:
            from esc_arch.data.demo import model_psnr
            from esc_arch.loading import CheckpointError
            try:
                scale, scores = model_psnr(args.report_model, root)
            except (CheckpointError, FileNotFoundError) as err:
                print(f'basicsr prepare: {err}', file=sys.stderr)
                return 2
            _print_scores(f'bicubic x{scale}', bicubic_baseline(root, scale))
            _print_scores(f'model   x{scale}', scores)
        return 0
    if not args.input:
        print('basicsr prepare: give -i HR_FOLDER (or --demo)', file=sys.stderr)
        return 2
    from esc_arch.data.prepare import prepare_dataset
    out_root = args.output or os.path.dirname(os.path.normpath(args.input))
    try:
        result = prepare_dataset(args.input, out_root, scales=args.scales, crop=args.crop, step=args.step,
                                 thresh=args.thresh, workers=max(1, args.workers), make_lmdb=not args.no_lmdb)
    except (ValueError, FileNotFoundError) as err:
        print(f'basicsr prepare: {err}', file=sys.stderr)
        return 2
    print(f'{result.num_images} images -> {result.num_sub_images} sub-images ({result.num_written} files written)')
    print(f'HR: {result.hr_sub_folder}')
    for scale, folder in result.lr_sub_folders.items():
        print(f'LR x{scale}: {folder}')
    for folder in result.lmdb_folders:
        print(f'LMDB: {folder}')
    if result.failed:
        print(f'{len(result.failed)} image(s) could not be read and were skipped:', file=sys.stderr)
        for line in result.failed:
            print(f'  {line}', file=sys.stderr)
        return 1
    return 0
