"""Small checks of settings shared across modules."""

from __future__ import annotations

__all__ = ["is_real"]


def is_real(value: object) -> bool:
    """Whether ``value`` is an int or float (not a bool, which is a slip for a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
