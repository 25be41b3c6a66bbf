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


class _GuardedStdout:
    """``sys.stdout`` that survives its own write errors (``> /dev/full``, a full disk): the first is
    said on stderr at once and the rest of the output is dropped, so the command's work goes on;
    ``failed`` holds the reason. A closed pipe (``| head``) is left to raise BrokenPipeError."""

    def __init__(self, stream, prog: str):
        self._stream = stream
        self._prog = prog
        self.failed = None

    def _call(self, method, *args):
        if self.failed is not None:
            return None
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failed = exc.strerror or str(exc)
            sys.stderr.write(f'{self._prog}: error: cannot write to standard output: {self.failed} '
                             '(the rest of it is dropped)\n')
            _discard_stdout(self._stream)
            return None

    def write(self, text):
        return self._call('write', text)

    def writelines(self, lines):
        return self._call('writelines', lines)

    def flush(self):
        return self._call('flush')

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _discard_stdout(stream=None) -> None:
    """Point stdout's file descriptor at /dev/null, so the interpreter's flush at exit has no second error."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), (stream or sys.stdout).fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    prog = f'basicsr {name}' if name else 'basicsr'
    stdout = sys.stdout
    guarded = _GuardedStdout(stdout, prog) if stdout is not None else None  # None: print() drops it all
    sys.stdout = guarded or stdout
    from esc_arch.runtime import Terminated, sigterm_as_interrupt
    try:
        try:
            with sigterm_as_interrupt():  # kill: the command ends as on Ctrl-C, its clean-up done
                code = _run(name, argv)
        except SystemExit as exc:  # argparse after --help (0) or a usage error (2, said on stderr)
            code = _exit_code(exc)
        if guarded is not None:
            guarded.flush()  # a block-buffered stdout fails here, not at exit
        return code or (1 if guarded is not None and guarded.failed else 0)  # done; its report is lost
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: what was written is complete (every write is atomic)
        terminated = isinstance(exc, Terminated)
        sys.stderr.write(f'{prog}: {"terminated" if terminated else "interrupted"}\n')
        return 143 if terminated else 130
    except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as `cat` does
        _discard_stdout()
        return 141
    finally:
        sys.stdout = stdout


def _exit_code(exc: SystemExit) -> int:
    """The status the interpreter would exit with for ``exc``; a message is said on stderr, as it does."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    sys.stderr.write(f'{exc.code}\n')
    return 1


def _run(name: str | None, argv: list[str]) -> int:
    if name is None:
        parser = build_parser()
        args = parser.parse_args(argv[:1])  # --help, or an error naming the valid commands
        parser.print_help()
        return 2 if args.command is None and argv else 0
    from esc_arch.runtime import tune_cpu_allocator
    tune_cpu_allocator()  # every subcommand runs big CPU tensors: reuse freed memory
    module = importlib.import_module(f'esc_arch.commands.{name}')
    sub_parser = argparse.ArgumentParser(prog=f'basicsr {name}', description=SUBCOMMANDS[name])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == '__main__':
    sys.exit(main())
