"""How the commands turn an exception into their one-line messages."""
from __future__ import annotations


class OptionError(Exception):
    """An option file or flag the pipeline cannot run; the message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
