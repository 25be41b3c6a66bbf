"""How the commands turn an exception into their one-line messages."""
from __future__ import annotations


class OptionError(Exception):
    """An option file or flag the pipeline cannot run; the message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def environment_problem(exc: BaseException) -> str | None:
    """One line for a failure of the machine rather than of the options or the code: a file that
    cannot be written or read (a read-only folder, a full disk, a name too long), memory running
    out; None for anything else."""
    if isinstance(exc, MemoryError):
        return 'out of memory (MemoryError)'
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename:
            return f'{exc.strerror}: {exc.filename}'
        return first_line(exc)
    if isinstance(exc, RuntimeError):
        line = first_line(exc)
        if "can't allocate memory" in line or 'out of memory' in line.lower():
            return f'out of memory: {line}'
        if 'could not create a primitive' in line:  # oneDNN, when its buffers cannot be allocated
            return f'{line} (oneDNN; out of memory?)'
        if line.startswith(('unable to resize file', 'unable to write to file', 'unable to open shared memory')):
            return f'{line} (the data loader workers\' shared memory, /dev/shm: full?)'
    return None
