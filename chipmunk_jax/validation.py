"""Argument checks: the one place they live, for every layer of chipmunk_jax.

A check takes ``(name, value)``, raises with ``name`` in the message when the value is wrong, and returns the
value normalised (a Python int for a numpy integer, a float for a number, a tuple for a list), so a caller
writes ``batch = positive_int("batch", batch)`` instead of an isinstance chain. Config dataclasses declare
their checks on the fields (``x: int = field(1, check=positive_int)``) and run them all in
``__post_init__`` with ``validate_fields(self)``.

Errors: a value of the wrong type raises ``InvalidTypeError``, a ``TypeError`` that is also a ``ValueError``
(the checks this module replaced raised ValueError for a float where an int belongs, and callers catch
either); a value of the right type out of range raises ``ValueError``.

A leaf module: it imports the standard library and numpy only, nothing from chipmunk_jax, so every layer
can import it (the kernels in pallas_kernels/, which import nothing else of the package, the core ops,
models/, ports/) without an import cycle.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Iterable

import numpy as np

__all__ = [
    "InvalidTypeError",
    "check_int",
    "positive_int",
    "non_negative_int",
    "is_power_of_two",
    "check_power_of_two",
    "check_number",
    "check_fraction",
    "check_bool",
    "check_choice",
    "check_int_tuple",
    "field",
    "optional",
    "validate_fields",
]

Check = Callable[[str, Any], Any]
_CHECK_KEY = "chipmunk_jax.validation.check"


class InvalidTypeError(TypeError, ValueError):
    """A check's value of the wrong type: a TypeError, and a ValueError as the replaced checks raised."""


def _is_int(value) -> bool:
    """Whether ``value`` is a Python or numpy integer (bools are not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_kind(minimum, maximum, plural: bool = False) -> str:
    """The words for integers in the given bounds: "a positive integer", "an integer in [0, 7]", "integers >= 64"."""
    noun = "integers" if plural else "integer"
    if maximum is not None:
        words = f"{noun} in [{minimum}, {maximum}]" if minimum is not None else f"{noun} <= {maximum}"
    elif minimum in (0, 1):
        words = f"{'positive' if minimum == 1 else 'non-negative'} {noun}"
    else:
        words = noun if minimum is None else f"{noun} >= {minimum}"
    if plural:
        return words
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _in_bounds(value, minimum, maximum) -> bool:
    """Whether minimum <= value <= maximum (None: unbounded on that side)."""
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, for a Python or numpy integer (not a bool) in [minimum, maximum]."""
    if not _is_int(value):
        raise InvalidTypeError(f"{name} must be {_int_kind(minimum, maximum)}, got {value!r}")
    if not _in_bounds(value, minimum, maximum):
        raise ValueError(f"{name} must be {_int_kind(minimum, maximum)}, got {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    """``check_int`` with minimum 1."""
    return check_int(name, value, minimum=1)


def non_negative_int(name: str, value) -> int:
    """``check_int`` with minimum 0."""
    return check_int(name, value, minimum=0)


def is_power_of_two(value) -> bool:
    """Whether ``value`` is an integer (not a bool) power of two: 1, 2, 4, ..."""
    return _is_int(value) and value >= 1 and value & (value - 1) == 0


def check_power_of_two(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as a Python int, for an integer power of two >= minimum (Triton's rule for tile sizes)."""
    kind = "a positive power of 2" if minimum <= 1 else f"a power of 2 >= {minimum}"
    if not _is_int(value):
        raise InvalidTypeError(f"{name} must be {kind}, got {value!r}")
    if not is_power_of_two(value) or value < minimum:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, minimum=None, maximum=None, positive: bool = False) -> float:
    """``value`` as a float, for a real number (not a bool) in [minimum, maximum] (and > 0 if ``positive``)."""
    if positive:
        kind = "a positive number"
    elif minimum is not None and maximum is not None:
        kind = f"a number in [{minimum}, {maximum}]"
    elif minimum is not None or maximum is not None:
        kind = f"a number >= {minimum}" if maximum is None else f"a number <= {maximum}"
    else:
        kind = "a number"
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be {kind}, got {value!r}")
    if not _in_bounds(value, minimum, maximum) or (positive and not value > 0):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def check_fraction(name: str, value) -> float:
    """``value`` as a float, for a number in [0, 1]."""
    return check_number(name, value, minimum=0, maximum=1)


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool, for a Python or numpy bool (not 0 / 1)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices: Iterable) -> Any:
    """``value`` itself, when it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        words = [repr(c) for c in choices]
        alternatives = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
        raise ValueError(f"{name} must be {alternatives}, got {value!r}")
    return value


def check_int_tuple(name: str, value, *, length: int | None = None, minimum: int | None = 1) -> tuple[int, ...]:
    """``value`` as a tuple of Python ints, for a list, tuple or 1-D array of integers >= minimum (of ``length``)."""
    count = "" if length is None else f"{length} "
    words = f"{name} must be a tuple of {count}{_int_kind(minimum, None, plural=True)}, got {value!r}"
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise InvalidTypeError(words)
    if (length is not None and len(value) != length) or not all(_in_bounds(v, minimum, None) for v in value):
        raise ValueError(words)
    return tuple(int(v) for v in value)


def optional(check: Check) -> Check:
    """A check that lets None through and runs ``check`` on anything else."""

    def check_or_none(name: str, value):
        return None if value is None else check(name, value)

    check_or_none.__name__ = f"optional({getattr(check, '__name__', repr(check))})"
    return check_or_none


def field(default=dataclasses.MISSING, *, check: Check):
    """A ``dataclasses.field`` whose metadata holds ``check(name, value) -> normalised value``."""
    return dataclasses.field(default=default, metadata={_CHECK_KEY: check})


def validate_fields(obj, prefix: str = "") -> None:
    """Runs the check of each ``field(..., check=)`` of dataclass ``obj`` (named ``prefix + field``), storing
    the normalised value back (through ``object.__setattr__``, so frozen dataclasses work too)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"validate_fields takes a dataclass instance, got {type(obj).__name__}")
    for f in dataclasses.fields(obj):
        check = f.metadata.get(_CHECK_KEY)
        if check is None:
            continue
        value = getattr(obj, f.name)
        normalised = check(f"{prefix}{f.name}", value)
        if normalised is not value:
            object.__setattr__(obj, f.name, normalised)
