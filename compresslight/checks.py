"""Argument checks and glob layer selection, written once.

Every public function and callback validates its arguments before it touches a model, and the
errors read the same everywhere: the argument in backticks, what it must be, what it got. Layer
patterns are `fnmatch` globs (case-sensitive) on `named_modules()` names; a pattern that matches
nothing is an error that lists the layers it could have matched, never a silent no-op.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

__all__ = [
    "check_choice",
    "check_int",
    "check_number",
    "check_patterns",
    "check_ratio",
    "layers_matching",
    "select_layers",
]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *, optional: bool = False) -> None:
    """Raises unless `value` is an int in [minimum, maximum] (`bool` is not an int here), or None when `optional`."""
    if optional and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        or_none = " or None" if optional else ""
        raise ValueError(f"`{name}` must be an int {bound}{or_none}, got {value!r}.")


def check_number(
    name: str,
    value: Any,
    *,
    greater_than: float | None = None,
    at_least: float | None = None,
    optional: bool = False,
) -> None:
    """Raises unless `value` is a finite real number (not a bool) above `greater_than` / at least `at_least`."""
    if optional and value is None:
        return
    bounds = []
    if greater_than is not None:
        bounds.append(f"> {greater_than}")
    if at_least is not None:
        bounds.append(f">= {at_least}")
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if (
        not is_real
        or (greater_than is not None and not value > greater_than)
        or (at_least is not None and not value >= at_least)
    ):
        what = " and ".join(bounds) if bounds else "a finite number"
        or_none = " or None" if optional else ""
        raise ValueError(f"`{name}` must be {what}{or_none}, got {value!r}.")


def check_ratio(name: str, value: Any, *, include_zero: bool = False, include_one: bool = True) -> None:
    """Raises unless `value` is a number in the unit interval; the bounds say which ends are allowed."""
    low, high = ("[" if include_zero else "("), ("]" if include_one else ")")
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    above = is_real and (value >= 0 if include_zero else value > 0)
    below = is_real and (value <= 1 if include_one else value < 1)
    if not (above and below):
        raise ValueError(f"`{name}` must be in {low}0, 1{high}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Collection[Any], *, optional: bool = False) -> None:
    """Raises unless `value` is one of `choices` (or None when `optional`)."""
    if optional and value is None:
        return
    if value not in choices:
        or_none = " or None" if optional else ""
        raise ValueError(f"`{name}` must be one of {list(choices)}{or_none}, got {value!r}.")


def check_patterns(name: str, patterns: Any) -> None:
    """Raises unless `patterns` is a sequence of glob strings; a bare string is the usual slip (it would
    iterate as one pattern per character)."""
    if isinstance(patterns, str):
        raise ValueError(f"`{name}` must be a list of patterns, got the string {patterns!r}.")
    if not isinstance(patterns, Iterable) or not all(isinstance(pattern, str) for pattern in patterns):
        raise ValueError(f"`{name}` must be a list of glob patterns (strings), got {patterns!r}.")


def layers_matching(argument: str, pattern: str, layers: Sequence[str], kind: str = "layer") -> list[str]:
    """The names in `layers` that glob `pattern` matches, in their order.

    Raises:
        ValueError: when it matches none; the message lists the `kind`s it could have matched.
    """
    matched = [name for name in layers if fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        raise ValueError(f"`{argument}` pattern {pattern!r} matches no {kind}; {kind}s are {list(layers)}.")
    return matched


def select_layers(argument: str, patterns: Sequence[str], layers: Sequence[str], kind: str = "layer") -> list[str]:
    """The names in `layers` that any of `patterns` matches, in the order of `layers`.

    Raises:
        ValueError: for a bare string instead of a list, or a pattern that matches no layer.
    """
    check_patterns(argument, patterns)
    selected: set[str] = set()
    for pattern in patterns:
        selected.update(layers_matching(argument, pattern, layers, kind))
    return [name for name in layers if name in selected]
