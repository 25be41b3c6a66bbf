"""LMDB environments shared within a process: LMDB refuses to open a database a second time in a
process, or in a worker forked from one that has it open, so every reader here (the data sets of a run,
the checks before it, ``basicsr prepare``) goes through one environment per path."""
from __future__ import annotations

import contextlib
import os
from os import path as osp

_LMDB_ENVS: dict = {}  # realpath -> (its data.mdb's identity, the read-only environment of this process)


def shared_lmdb(path: str, lock: bool = False, readahead: bool = False, **kwargs):
    """The read-only environment of the LMDB at ``path``, one per path and process (LMDB refuses to open
    a database a second time in a process, or in a worker forked from one that has it open): what the
    checks, prepare and every data set of a run read. A database made again since is opened again."""
    import lmdb
    real = osp.realpath(path)
    try:
        stat = os.stat(osp.join(real, 'data.mdb'))
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        identity = None  # lmdb.open says what is wrong
    known, env = _LMDB_ENVS.get(real, (None, None))
    if env is None or known != identity:
        if env is not None:
            _LMDB_ENVS.pop(real)[1].close()
        env = lmdb.open(path, readonly=True, lock=lock, readahead=readahead, **kwargs)
        _LMDB_ENVS[real] = (identity, env)
    return env


@contextlib.contextmanager
def reading_lmdb(path: str):
    """The shared environment of ``path`` for a short read: where no data set of this process had it
    open, it is closed after (so a writer, e.g. the LMDB made again, can open it meanwhile)."""
    opened = osp.realpath(path) not in _LMDB_ENVS
    env = shared_lmdb(path)
    try:
        yield env
    finally:
        if opened:
            _LMDB_ENVS.pop(osp.realpath(path))[1].close()
