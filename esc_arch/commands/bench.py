"""``basicsr bench``: params, FLOPs, latency and peak memory of registered archs.

Each measurement runs in a fresh child process; see ``esc_arch.benchmark`` for the method.
"""
from __future__ import annotations

import argparse
import sys

from esc_arch import benchmark
from esc_arch.plugins import add_import_argument
from esc_arch.runtime import Terminated, sigterm_as_interrupt, slow_bf16_warning


class _InOrder(argparse.Action):
    """``append``, also noting (kind, value) in ``ordered``: the archs are measured in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values])
        namespace.ordered = [*(getattr(namespace, 'ordered', None) or []), (self.dest, values)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ('examples:\n'
                     '  basicsr bench --preset esc --preset swinir-light --device cpu\n'
                     '  basicsr bench --arch ESC:dim=64,pdim=16,kernel_size=13,n_blocks=5,conv_blocks=5,'
                     'window_size=32,num_heads=4,upscaling_factor=4,exp_ratio=1.25\n'
                     '  basicsr bench --opt options/train_ESC_SRx4.yml --lr-size 48x64 --check\n'
                     '  basicsr bench --import my_archs/hit_srf_arch.py --arch HiT_SRF:upscale=4 --preset esc\n'
                     f"presets: {', '.join(benchmark.PRESETS)} (overrides: --preset esc:n_blocks=3)")
    what = parser.add_argument_group('what to measure (any number, in order)')
    what.add_argument('--arch', action=_InOrder, default=[], metavar='NAME[:k=v,...]',
                      help='a registered arch and its constructor options, '
                      'e.g. EDSR:num_in_ch=3,num_out_ch=3,num_feat=64,upscale=4')
    what.add_argument('--opt', action=_InOrder, default=[], metavar='YAML',
                      help='a BasicSR option file; its network_g section is measured')
    add_import_argument(what, '--arch / --opt can name')
    what.add_argument('--preset', action=_InOrder, default=[], metavar='NAME[:k=v,...]',
                      help=f"a named config: {', '.join(benchmark.PRESETS)}")
    how = parser.add_argument_group('settings')
    how.add_argument('--scale', type=int, default=4, help='upscaling factor of the presets; the default LR size '
                     'is 720/scale x 1280/scale, i.e. a 1280x720 output (default 4)')
    how.add_argument('--lr-size', metavar='HxW', help='LR input size, e.g. 180x320 (default: from --scale)')
    how.add_argument('--runs', type=int, default=5, help='timed runs (default 5)')
    how.add_argument('--warmup', type=int, default=1, help='untimed warm-up runs (default 1)')
    how.add_argument('--device', default='cpu', help='cpu or cuda[:N] (default cpu)')
    how.add_argument('--dtype', default='fp32', choices=benchmark.DTYPES, help='fp16 is CUDA only (default fp32)')
    how.add_argument('--threads', type=int, help=f'torch threads (default: the CPUs this process may run on, '
                     f'{benchmark.default_threads()})')
    how.add_argument('--check', action='store_true',
                     help='also report the max abs error against the same model in float64')
    how.add_argument('--no-pad', action='store_true',
                     help="do not pad the input to the arch's window_size (by default every arch that has one is "
                     'padded, and the padded size is reported)')
    how.add_argument('--seed', type=int, default=0, help='seed of the random input (default 0)')
    how.add_argument('--timeout', type=float, help='seconds allowed per measurement (default: none)')
    out = parser.add_argument_group('output')
    out.add_argument('--out', default='benchmarks',
                     help='folder for the JSON records and the plot (default benchmarks)')
    out.add_argument('--plot', default='latency_vs_params.png', help='plot file name inside --out ("" for none)')
    out.add_argument('--no-progress', action='store_true', help='hide the progress bar')


def run(args: argparse.Namespace) -> int:
    try:
        with sigterm_as_interrupt():  # kill: end the worker and clean up too
            return _run(args)
    except KeyboardInterrupt as exc:
        print('basicsr bench: interrupted; the records written so far are kept', file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _run(args: argparse.Namespace) -> int:
    try:
        imports = benchmark.import_user_archs(args.imports)  # before the specs check the arch names
        ordered = getattr(args, 'ordered', None) or ([('preset', p) for p in args.preset] + [
            ('arch', a) for a in args.arch] + [('opt', o) for o in args.opt])
        make = {'preset': lambda text: benchmark.preset_spec(text, args.scale), 'arch': benchmark.arch_spec,
                'opt': benchmark.opt_spec}
        specs = [make[kind](value) for kind, value in ordered]
        if not specs:
            raise benchmark.BenchError('nothing to measure: give --preset, --arch or --opt '
                                       f"(presets: {', '.join(benchmark.PRESETS)})")
        lr_size = benchmark.parse_size(args.lr_size) if args.lr_size else benchmark.default_lr_size(args.scale)
        settings = {'lr_size': lr_size, 'device': args.device, 'dtype': args.dtype, 'runs': args.runs,
                    'warmup': args.warmup, 'threads': args.threads, 'check': args.check, 'seed': args.seed,
                    'pad': not args.no_pad, 'imports': imports}
        benchmark.validate_settings(settings)
        benchmark.validate_timeout(args.timeout)
        benchmark.check_specs(specs)  # every spec, before the first one is measured
        if not args.out:
            raise benchmark.BenchError('--out must name a folder')
        plot = benchmark.prepare_output(args.out, args.plot)  # the folders, before measuring
        if settings['dtype'] == 'bf16' and (warning := slow_bf16_warning(settings['device'])):
            print(f'basicsr bench: warning: {warning}', file=sys.stderr)
        failures = []
        records = benchmark.run_benchmarks(specs, settings, out_dir=args.out, progress=not args.no_progress,
                                           timeout=args.timeout, failures=failures)
    except benchmark.BenchError as err:
        print(f'basicsr bench: error: {err}', file=sys.stderr)
        return 2
    if not records:  # each failure was said as it happened
        return 2
    print(benchmark.format_table(records))
    first = records[0]
    print(f"device {first['device']} ({first['device_name'] or first['cpu_model']}), {first['dtype']}, "
          f"{first['threads']} threads, torch {first['torch_version']}, {first['runs']} "
          f"run{'s' * (first['runs'] != 1)} after {first['warmup']} warm-up; FLOPs: {first['flops_method']}")
    from esc_arch.arch_options import SCALE_KEYS
    for record in records:
        if record['check_max_abs_err'] is not None:
            print(f"check {record['arch']}: max abs error vs float64 = {record['check_max_abs_err']:.3g}")
        if record['flops_uncounted_ops']:
            print(f"warning: {record['arch']}: FLOPs miss {', '.join(record['flops_uncounted_ops'])}")
        said = [(key, record['options'][key]) for key in SCALE_KEYS if isinstance(record['options'].get(key), int)]
        if said and record['scale'] != said[0][1]:
            h, w = record['output_size']
            print(f"warning: {record['arch']}: its output {h}x{w} is x{record['scale']:g} its input, but "
                  f"{said[0][0]} is {said[0][1]}")
    print(f'records written to {args.out}/')
    if plot:
        everything = benchmark.collect_records(args.out, records[0]) or records
        try:
            plot = benchmark.plot_records(everything, plot)
        except (OSError, benchmark.BenchError) as err:
            print(f"basicsr bench: error: cannot write the plot {plot}: {getattr(err, 'strerror', None) or err}",
                  file=sys.stderr)
            return 1
        print(f'plot: {plot}' if plot else 'plot skipped: matplotlib is not installed (pip install matplotlib)')
    if failures:
        print(f"basicsr bench: {len(failures)} of {len(specs)} not measured: {', '.join(l for l, _ in failures)}",
              file=sys.stderr)
        return 1
    return 0
