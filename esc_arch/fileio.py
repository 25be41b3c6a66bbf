"""Atomic file writes: the one place every command writes results through.

A kill or an error during a write never leaves a partial file at the destination: data goes to
a temporary file in the same folder (same extension, so writers that pick the format by name,
like OpenCV, still work), is flushed to disk, and is then renamed over the destination.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

from .messages import first_line

# temp files are '.<stem>.<random>.tmp<suffix>': hidden, and never matching '<name><suffix>' patterns
# that readers look for (e.g. '<iter>.state'), whose stem must be the bare name.
_TEMP_NAME = re.compile(r'^\..+\.tmp(\.[^.]+)?$')


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A destination that cannot be written (its folder is missing or read-only, it is a
    folder, ...); the message names the destination, not the temporary file."""

    def __init__(self, path: Path, exc: OSError):
        super().__init__(exc.errno, exc.strerror or str(exc))
        self.path = path

    def __str__(self) -> str:
        return f'cannot write {self.path}: {self.strerror}'


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, failed_writes: tuple[type[BaseException], ...] = ()):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.
    Failing to create the temporary file or to rename it raises :class:`WriteError`, and so do the
    ``failed_writes``: the exceptions by which the caller's writer reports that its write failed (a
    full disk) where it raises no OSError (``torch.save``'s RuntimeError, safetensors' own)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.stem}.', suffix=f'.tmp{path.suffix}', dir=path.parent or '.')
    except OSError as exc:
        raise WriteError(path, exc) from exc
    os.close(fd)
    try:
        try:
            yield tmp
        except failed_writes as exc:
            problem = f'the write failed, is the disk full? ({first_line(exc)})'
            raise WriteError(path, OSError(errno.EIO, problem)) from exc
        try:
            with open(tmp, 'rb+') as handle:  # make the bytes durable before the rename
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what a plain open() would
            os.replace(tmp, path)
        except OSError as exc:
            raise WriteError(path, exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_path` makes."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temp_files(directory: str | os.PathLike, stem: str | None = None) -> list[str]:
    """Delete the temp files a killed writer left in ``directory`` (only those of files named
    ``stem.*`` when given: a shared folder may hold other writers' files); returns their names."""
    removed = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if is_temp_name(name) and (stem is None or name.startswith(f'.{stem}.')):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
                    removed.append(name)
    return sorted(removed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, 'wb') as handle:
        handle.write(data)
