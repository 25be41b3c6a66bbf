"""Importing the user's own arch modules (``--import``), so that archs outside BasicSR and
esc-arch (HiT-SR, MambaIR, a model of one's own, ...) that register themselves with
``@ARCH_REGISTRY.register()`` can be benchmarked, trained and tested like the built-in ones.

An item is a module name (``hitsr.archs``, importable from ``sys.path``), a ``.py`` file, or a
folder, whose ``*_arch.py`` files are imported in name order (BasicSR's own convention for
``basicsr/archs``); a bare name of a module or package here is imported as that module. A
file is imported with its folder put first on ``sys.path``, so it can import its neighbours.
Each item is imported once per process.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys

_imported: dict[str, str] = {}  # resolved item -> module name
_imported_files: dict[str, str] = {}  # a file, also one imported through its folder -> module name


def add_import_argument(parser, purpose: str) -> None:
    """The ``--import`` flag (repeatable; ``args.imports``) of the commands that take user archs."""
    parser.add_argument('--import', dest='imports', action='append', default=[], metavar='MODULE|FILE.py|FOLDER',
                        help=f'import your own arch module first, so {purpose} an arch it registers into '
                        'ARCH_REGISTRY (e.g. HiT-SR, MambaIR); a folder imports its *_arch.py files')


class PluginImportError(ImportError):
    """An ``--import`` item that cannot be imported; the message is one line naming it."""


# what a user's module may raise as it is imported, said as one line naming it: also sys.exit()
# (e.g. where an optional package it needs is missing), which would end the command with its message alone
_MODULE_FAILURES = (Exception, SystemExit)


def _resolve(item: str) -> str:
    """A path item as an absolute path; a module name as it is (a bare name that is also a folder
    here counts as a module when the folder is a package, i.e. has an ``__init__.py``)."""
    separator = os.sep in item or bool(os.altsep and os.altsep in item)
    package = os.path.isfile(os.path.join(item, '__init__.py'))
    if item.endswith('.py') or separator or (os.path.exists(item) and not package):
        path = os.path.abspath(os.path.expanduser(item))
        if not os.path.exists(path):
            raise PluginImportError(f'--import {item}: no such file or folder')
        return path
    return item


def _importable_as(stem: str, path: str) -> bool:
    """Whether ``import stem`` gives the file ``path`` (its folder is first on ``sys.path``, or a
    neighbour imported it already); not where another module of that name comes first."""
    try:
        spec = importlib.util.find_spec(stem)
    except (ImportError, ValueError):  # e.g. a dot in the name; a module without a spec
        return False
    return spec is not None and bool(spec.origin) and os.path.abspath(spec.origin) == path


def _import_file(path: str) -> str:
    if path in _imported_files:  # e.g. --import plugins --import plugins/my_arch.py
        return _imported_files[path]
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    if _importable_as(stem, path):  # one module with its neighbours' `import stem`, not a second copy
        _imported_files[path] = importlib.import_module(stem).__name__  # (which would register its archs again)
        return _imported_files[path]
    name = f'esc_arch_user_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}'  # a name of its own
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginImportError(f'--import {path}: not a Python file')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _imported_files[path] = name
    return name


def _import_one(item: str) -> str:
    """``item`` as ``_resolve`` returns it: an absolute path (folder or file), else a module name."""
    if not os.path.isabs(item):
        top = item.split('.')[0]
        here = os.path.isfile(os.path.join(top, '__init__.py')) or os.path.isfile(f'{top}.py')
        if here and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module or package here, as `python -m` would find it
        return importlib.import_module(item).__name__
    if os.path.isdir(item):
        files = sorted(f for f in os.listdir(item) if f.endswith('_arch.py'))
        if not files:
            raise PluginImportError(f'--import {item}: the folder has no *_arch.py files')
        names = []
        for file in files:
            try:
                names.append(_import_file(os.path.join(item, file)))
            except PluginImportError:
                raise
            except _MODULE_FAILURES as exc:  # say which of the folder's files failed
                raise _failure(f'{item} ({file})', exc) from None
        return ', '.join(names)
    return _import_file(item)


def _failure(where: str, exc: BaseException) -> PluginImportError:
    """Anything the user's module raised, as one line."""
    if isinstance(exc, SyntaxError):
        return PluginImportError(f'--import {where}: syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}')
    first = (str(exc).strip().splitlines() or [''])[0]
    return PluginImportError(f'--import {where}: {type(exc).__name__}: {first}')


def import_arch_modules(items) -> list[str]:
    """Import every item (see the module docstring); returns them resolved (absolute paths, module
    names), as a child process can import them again. Raises ``PluginImportError`` naming the item
    on any failure, including an arch that registers a name already taken."""
    import esc_arch  # noqa: F401  (BasicSR importable, our archs registered, before the user's)
    resolved = []
    for item in items or ():
        key = _resolve(str(item))
        if key not in _imported:
            try:
                _imported[key] = _import_one(key)
            except PluginImportError:
                raise
            except _MODULE_FAILURES as exc:  # anything the user's module raises: one line
                raise _failure(item, exc) from None
        resolved.append(key)
    return resolved
