"""``basicsr export``: an ESC checkpoint to ONNX (verified with onnxruntime) or to .safetensors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OPSET = 17


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('-m', '--model', required=True, help='ESC checkpoint (.pth/.pt/.safetensors)')
    parser.add_argument('-o', '--output', required=True,
                        help='output file; its extension picks the format: .onnx or .safetensors')
    parser.add_argument('--fp16', action='store_true', help='ONNX: fp16 weights, input and output')
    parser.add_argument('--opset', type=int, help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--attn', choices=('sdpa', 'naive'),
                        help='attention backend traced into the ONNX graph (default sdpa)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')


def _error(message: str) -> int:
    print(f'basicsr export: error: {message}', file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import esc_arch
    from esc_arch.export import ONNX_TOLERANCE, ExportError, export_onnx, require_onnx, save_safetensors, verify_onnx
    from esc_arch.fileio import WriteError
    from esc_arch.loading import CheckpointError

    output = Path(args.output)
    kind = output.suffix.lower()
    if kind not in ('.onnx', '.safetensors'):
        return _error(f'cannot tell the format of {output}: use a .onnx or .safetensors file name')
    onnx_only = [flag for flag, given in (('--fp16', args.fp16), ('--opset', args.opset is not None),
                                          ('--attn', args.attn is not None)) if given]
    if kind == '.safetensors' and onnx_only:
        return _error(f'{", ".join(onnx_only)}: ONNX only; a .safetensors file holds the checkpoint\'s weights '
                      '(in float32) for PyTorch')
    if output.is_dir():  # --overwrite would export first and fail at the end
        return _error(f'{output} is a folder: give a file name')
    if output.exists() and not args.overwrite:
        return _error(f'{output} exists (use --overwrite)')
    if not output.parent.is_dir():
        return _error(f'output folder not found: {output.parent}')
    try:
        if kind == '.onnx':
            require_onnx()  # fail before the (slow) model load
        model = esc_arch.load_model(args.model)
    except (CheckpointError, ExportError) as exc:
        return _error(str(exc))
    config = ', '.join(f'{k}={v}' for k, v in model.config.items())

    if kind == '.safetensors':
        try:
            save_safetensors(model, output)
        except OSError as exc:
            return _error(str(exc))
        print(f'wrote {output} ({config})')
        return 0

    precision = 'fp16' if args.fp16 else 'fp32'
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:
        export_onnx(model, output, opset=opset, fp16=args.fp16, attn_type=args.attn or 'sdpa')
        results = verify_onnx(output, model, fp16=args.fp16)
    except (ExportError, WriteError) as exc:  # WriteError: the file cannot be written (a read-only folder, ...)
        return _error(str(exc))
    except Exception as exc:  # the exporter's or onnxruntime's own failure: one line, not a traceback
        return _error(f'ONNX export failed ({type(exc).__name__}): {str(exc).strip().splitlines()[0]}')
    worst = max(r['max_abs_err'] for r in results)
    for r in results:
        print(f'onnxruntime vs PyTorch, input {"x".join(map(str, r["shape"]))}: max abs error {r["max_abs_err"]:.3g}')
    tolerance = ONNX_TOLERANCE[precision]
    if worst > tolerance:
        print(f'basicsr export: error: ONNX output differs from PyTorch by {worst:.3g} > {tolerance:g} ({precision}); '
              f'{output} is kept for inspection', file=sys.stderr)
        return 1
    print(f'wrote {output} ({precision}, opset {opset}, dynamic batch/height/width, each side more than '
          f'{model.window_size // 2} px; {config})')
    return 0
