"""Plain data: what task arguments and results may be, so that they can cross a broker.

Plain means JSON's data model exactly: ``str``, ``int``, ``float``, ``bool``, ``None``,
lists (tuples are read as lists) and dicts with ``str`` keys. ``json.dumps`` alone is
not a check: it turns ``{1: "a"}`` into ``{"1": "a"}`` without a word, and the task
would receive different arguments over Redis than in memory. Strings must be valid
Unicode text: a lone surrogate (a code point from U+D800 to U+DFFF on its own) is a
Python ``str`` that UTF-8, and so the wire, cannot carry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["all_simple", "find_unplain"]

_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_MAX_DEPTH: Final = 100
_SIMPLE: Final = frozenset({int, float, bool, type(None)})


def find_unplain(value: object, path: str = "") -> str | None:
    """Return where ``value`` stops being plain data (``"[0]['when']: datetime"``), or None."""
    return _find(value, path, 0)


def all_simple(values: Iterable[object]) -> bool:
    """Whether every value is a number, a bool, None or an ASCII str: plain at a glance.

    The common arguments (ids, counts, names), checked without building the paths
    `find_unplain` reports; False only means "look closer", not "not plain".
    """
    for value in values:
        kind = type(value)
        if kind is str:
            if not value.isascii():  # type: ignore[attr-defined]
                return False
        elif kind not in _SIMPLE:
            return False
    return True


def _find(value: object, path: str, depth: int) -> str | None:
    kind = type(value)
    if kind in _SCALARS:
        return _find_surrogate(value, path) if kind is str else None
    if depth >= _MAX_DEPTH:
        return f"{path or 'value'}: nested deeper than {_MAX_DEPTH} levels"
    items: list[tuple[object, object]]
    if isinstance(value, list | tuple) and (kind is list or kind is tuple):
        items = list(enumerate(value))
    elif isinstance(value, dict) and kind is dict:
        items = list(value.items())
        for key, _ in items:
            problem = (
                f"{path}[{key!r}]: a {type(key).__name__} key (keys must be str)"
                if type(key) is not str
                else _find_surrogate(key, f"{path}[{key!r}]")
            )
            if problem is not None:
                return problem
    else:
        return f"{path or 'value'}: {kind.__name__}"
    for key, item in items:
        found = _find(item, f"{path}[{key!r}]", depth + 1)
        if found is not None:
            return found
    return None


def _find_surrogate(text: object, path: str) -> str | None:
    """Where a str holds a lone surrogate: Python allows one, UTF-8 cannot carry it."""
    if type(text) is not str or text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{path or 'value'}: a str with a lone surrogate at index {exc.start}"
    return None
