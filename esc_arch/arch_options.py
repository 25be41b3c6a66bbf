"""Whether a set of options builds an arch, as far as its constructor's signature tells: the one
check behind ``basicsr bench``'s specs and the train/test commands' ``network_*`` sections, so a
misspelt, missing or mistyped option is one line before anything is built or measured."""
from __future__ import annotations

import inspect

# the names archs give their upscaling factor: ESC's, SwinIR/EDSR/RCAN's, ..., RRDBNet's
SCALE_KEYS = ('upscaling_factor', 'upscale', 'upscale_factor', 'scale')

# annotation -> the Python types a value for it may have (bool is not an int here)
_ACCEPTED = {int: (int, ), float: (int, float), bool: (bool, ), str: (str, )}


def _signature(arch) -> inspect.Signature | None:
    try:
        return inspect.signature(arch, eval_str=True)  # annotations as types
    except Exception:  # an annotation that does not evaluate: names and defaults still count
        try:
            return inspect.signature(arch)
        except (TypeError, ValueError):  # no introspectable signature: building it will tell
            return None


def _type_problem(params, options: dict) -> str | None:
    for name, value in options.items():
        param = params.get(name)
        kinds = _ACCEPTED.get(param.annotation) if param is not None else None
        if kinds and value is not None and not (isinstance(value, kinds)
                                                and (bool in kinds or not isinstance(value, bool))):
            return f'{name} must be {param.annotation.__name__}, got {value!r}'
    return None


def options_problem(arch, options: dict, supplied: tuple = (), names_only: bool = False) -> str | None:
    """None when ``arch(**options)`` binds its signature with values of the annotated types;
    otherwise one line: unknown and missing options (with the names it takes), or the first value
    of a wrong type (``dim: "16"``). An arch taking ``**kwargs`` accepts any name (unless
    ``names_only``: its ``**kwargs`` are known to be unused); its required arguments and annotated
    types are still checked. ``supplied``: arguments the caller passes itself (e.g. a metric's
    images), neither required nor allowed in ``options``."""
    signature = _signature(arch)
    if signature is None:
        return None
    params = signature.parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values()) and not names_only
    named = {name: p for name, p in params.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in supplied}
    unknown = [] if takes_any else sorted(set(options) - set(named))
    unknown += sorted(name for name in options  # positional-only: cannot be given by name
                      if name in named and named[name].kind == inspect.Parameter.POSITIONAL_ONLY)
    missing = [name for name, p in named.items() if p.default is p.empty and name not in options]
    if unknown or missing:
        problem = '; '.join(filter(None, [unknown and f'unknown option(s) {", ".join(unknown)}',
                                          missing and f'missing option(s) {", ".join(missing)}']))
        return f'{problem}; it takes: {", ".join(named)}'
    return _type_problem(params, options)


def default_scale(arch) -> tuple[str, int] | None:
    """(name, value) of the upscaling factor ``arch`` builds when its options leave it out: the
    default of its constructor's first ``SCALE_KEYS`` parameter, if that is a whole number."""
    signature = _signature(arch)
    key = next((key for key in SCALE_KEYS if signature is not None and key in signature.parameters), None)
    if key is None:
        return None
    default = signature.parameters[key].default
    return (key, default) if isinstance(default, int) and not isinstance(default, bool) else None
