"""``basicsr prepare``: HR folder -> sub-images, bicubic LR, LMDB; or build the embedded demo set."""
from __future__ import annotations

import os
import sys

DEFAULTS = {'crop': 480, 'step': 240, 'thresh': 48}
DEFAULT_SCALES = (2, 3, 4)


def add_arguments(parser):
    parser.add_argument('-i', '--input', help='folder of HR images, e.g. datasets/DIV2K/DIV2K_train_HR')
    parser.add_argument('-o', '--output', default=None,
                        help='output root (default: the parent of --input; with --demo: datasets/demo)')
    parser.add_argument('--scales', type=int, nargs='+',
                        help=f'LR scales (default: {" ".join(map(str, DEFAULT_SCALES))}; with --demo: those '
                        '--report-bicubic scores)')
    # crop/step/thresh default to None so that giving them with --demo (which ignores them) is an error
    parser.add_argument('--crop', type=int, default=None, help=f'sub-image size (default {DEFAULTS["crop"]})')
    parser.add_argument('--step', type=int, default=None, help=f'sub-image stride (default {DEFAULTS["step"]})')
    parser.add_argument('--thresh', type=int, default=None,
                        help=f'add a last patch when the remainder exceeds this (default {DEFAULTS["thresh"]})')
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


def _usage_error(args) -> str | None:
    """Options that exclude each other or do not apply, as one message (None when the line is consistent)."""
    if args.demo:
        if args.input:
            return '--demo builds the embedded demo set and takes no -i; drop -i, or drop --demo to prepare -i'
        ignored = [f'--{name}' for name in DEFAULTS if getattr(args, name) is not None]
        ignored += ['--no-lmdb'] if args.no_lmdb else []
        if ignored:
            return (f'--demo builds the demo set of whole images and takes no {", ".join(ignored)}; drop '
                    f'{"it" if len(ignored) == 1 else "them"}, or drop --demo to prepare -i')
        if args.scales and not args.report_bicubic:
            return ('--demo always builds X2, X3 and X4 (and --report-model scores at the model\'s own scale): '
                    '--scales only picks the scales of --report-bicubic; drop it, or add --report-bicubic')
        if args.report_bicubic:
            from esc_arch.data.demo import SCALES
            unknown = [s for s in args.scales or () if s not in SCALES]
            if unknown:
                return (f'--report-bicubic: the demo set has scales {", ".join(map(str, SCALES))}, not '
                        f'{", ".join(map(str, unknown))}; pick --scales among them')
        return None
    used = [flag for flag, on in (('--report-bicubic', args.report_bicubic), ('--report-model', args.report_model))
            if on]
    if used:
        return f'{" and ".join(used)}: only with --demo (scores the demo validation images); add --demo'
    if not args.input:
        return 'give -i HR_FOLDER (or --demo)'
    if args.workers < 1:
        return f'--workers must be at least 1, got {args.workers}'
    return None


def run(args) -> int:
    import esc_arch  # noqa: F401  (before basicsr)

    problem = _usage_error(args)
    if problem:
        print(f'basicsr prepare: {problem}', file=sys.stderr)
        return 2
    if args.demo:
        from esc_arch.data.demo import DEFAULT_DEMO_ROOT, bicubic_baseline, ensure_demo_data
        root = args.output or DEFAULT_DEMO_ROOT
        try:
            paths = ensure_demo_data(root)
        except OSError as err:  # a read-only folder, a full disk
            from esc_arch.messages import environment_problem
            print(f'basicsr prepare: {environment_problem(err)}', file=sys.stderr)
            return 2
        print(f'train: {paths["train"]["HR"]}  val: {paths["val"]["HR"]}  (LR in .../LR_bicubic/X2, X3, X4)')
        if args.report_bicubic:
            for scale in args.scales or DEFAULT_SCALES:
                _print_scores(f'bicubic x{scale}', bicubic_baseline(root, scale))
        if args.report_model:
            from esc_arch.data.demo import model_psnr
            from esc_arch.loading import CheckpointError
            try:
                scale, scores = model_psnr(args.report_model, root)
            except (CheckpointError, FileNotFoundError, ValueError) as err:
                print(f'basicsr prepare: {err}', file=sys.stderr)
                return 2
            _print_scores(f'bicubic x{scale}', bicubic_baseline(root, scale))
            _print_scores(f'model   x{scale}', scores)
        return 0
    from esc_arch.data.prepare import default_out_root, prepare_dataset
    settings = {name: default if getattr(args, name) is None else getattr(args, name)
                for name, default in DEFAULTS.items()}
    try:
        out_root = args.output or default_out_root(args.input)  # '-i .' -> '..', not '.'
        result = prepare_dataset(args.input, out_root, scales=list(args.scales or DEFAULT_SCALES),
                                 workers=args.workers, make_lmdb=not args.no_lmdb, **settings)
    except (ValueError, OSError) as err:  # bad settings or input, other settings recorded, unwritable output
        print(f'basicsr prepare: {err}', file=sys.stderr)
        return 2
    if result.removed_temp_files:
        print(f'removed {len(result.removed_temp_files)} temporary file(s) left by an interrupted run')
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
    if not result.num_sub_images:
        print(f'basicsr prepare: no image in {args.input} is as large as the crop ({settings["crop"]} px), so there '
              'is nothing to train on; give a smaller --crop (and --step)', file=sys.stderr)
        return 1
    return 0
