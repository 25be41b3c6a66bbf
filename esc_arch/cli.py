"""The ``basicsr`` console command: ``basicsr <subcommand> ...``.

Each subcommand lives in ``esc_arch/commands/<name>.py`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``basicsr --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    'train': 'train a model from a BasicSR option YAML (any arch in ARCH_REGISTRY)',
    'test': 'test a model from a BasicSR option YAML',
    'prepare': 'turn a folder of HR images into sub-images, bicubic LR and LMDB',
    'upscale': 'super-resolve images with a trained or released ESC checkpoint',
    'export': 'export an ESC checkpoint to ONNX or .safetensors',
    'bench': 'measure params, FLOPs, latency and memory of registered archs',
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='basicsr', description='BasicSR with the ESC family (esc-arch).')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


class StdoutError(Exception):
    """Standard output could not be written (``> /dev/full``, a full disk): told apart from a failure
    to write the command's own files, which the commands report themselves."""


class _GuardedStdout:
    """``sys.stdout`` whose write errors, other than a closed pipe, are raised as :class:`StdoutError`."""

    def __init__(self, stream):
        self._stream = stream

    def _call(self, method, *args):
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutError(exc.strerror or str(exc)) from exc

    def write(self, text):
        return self._call('write', text)

    def writelines(self, lines):
        return self._call('writelines', lines)

    def flush(self):
        return self._call('flush')

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's flush at exit has no second error."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv[:1])  # --help, or an error naming the valid commands
        parser.print_help()
        return 2 if args.command is None and argv else 0
    name, rest = argv[0], argv[1:]
    from esc_arch.runtime import tune_cpu_allocator
    tune_cpu_allocator()  # every subcommand runs big CPU tensors: reuse freed memory
    module = importlib.import_module(f'esc_arch.commands.{name}')
    sub_parser = argparse.ArgumentParser(prog=f'basicsr {name}', description=SUBCOMMANDS[name])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a block-buffered stdout fails here, not at exit
        return code
    except KeyboardInterrupt:  # Ctrl-C: what was written is complete (every write is atomic)
        sys.stderr.write(f'basicsr {name}: interrupted\n')
        return 130
    except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as `cat` does
        _discard_stdout()
        return 141
    except StdoutError as exc:  # what the command wrote to its files is complete; only the report is lost
        sys.stderr.write(f'basicsr {name}: error: cannot write to standard output: {exc}\n')
        _discard_stdout()
        return 1
    finally:
        sys.stdout = stdout


if __name__ == '__main__':
    sys.exit(main())
