import dataclasses
import functools

import numpy as np
import pytest

from chipmunk_jax import validation as V


_NOT_INTS = [2.5, "4", None, True, np.bool_(True)]


@pytest.mark.parametrize(
    "kwargs, words, bad",
    [(dict(minimum=1), "must be a positive integer", b) for b in [0, -1, *_NOT_INTS]]
    + [(dict(minimum=0), "must be a non-negative integer", b) for b in [-1, *_NOT_INTS]]
    + [(dict(minimum=64), "must be an integer >= 64", b) for b in [63, *_NOT_INTS]]
    + [(dict(maximum=3), "must be an integer <= 3", b) for b in [4, *_NOT_INTS]]
    + [(dict(minimum=0, maximum=3), r"must be an integer in \[0, 3\]", b) for b in [-1, 4, *_NOT_INTS]],
)
def test_check_int_rejects_with_the_name_and_bound(kwargs, words, bad):
    with pytest.raises(ValueError, match=f"my_arg {words}, got"):
        V.check_int("my_arg", bad, **kwargs)


def test_check_int_accepts_python_and_numpy_ints_and_returns_python_ints():
    for value in (3, np.int32(3), np.int64(3), np.uint8(3)):
        out = V.check_int("n", value, minimum=1)
        assert out == 3 and type(out) is int
    assert V.positive_int("n", 1) == 1 and V.non_negative_int("n", 0) == 0
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        V.positive_int("n", 0)
    with pytest.raises(ValueError, match="n must be a non-negative integer, got -1"):
        V.non_negative_int("n", -1)


def test_type_errors_are_both_type_and_value_errors():
    with pytest.raises(TypeError, match="flag must be a bool, got 1"):
        V.check_bool("flag", 1)
    with pytest.raises(ValueError, match="flag must be a bool"):
        V.check_bool("flag", "yes")
    with pytest.raises(TypeError, match="positive integer"):
        V.positive_int("n", 1.0)
    with pytest.raises(ValueError) as range_error:
        V.positive_int("n", 0)
    assert not isinstance(range_error.value, TypeError)  # a wrong value of the right type is a plain ValueError
    assert V.check_bool("flag", np.bool_(False)) is False


def test_numbers_fractions_choices_and_powers_of_two():
    assert V.check_number("x", 2) == 2.0 and type(V.check_number("x", np.float32(0.5))) is float
    assert V.check_fraction("f", 1) == 1.0 and V.check_fraction("f", 0.0) == 0.0
    for bad in (1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"f must be a number in \[0, 1\], got"):
            V.check_fraction("f", bad)
    with pytest.raises(ValueError, match="x must be a positive number, got 0"):
        V.check_number("x", 0, positive=True)
    with pytest.raises(ValueError, match="x must be a number >= 2"):
        V.check_number("x", 1, minimum=2)
    assert V.check_choice("kind", "tiles", ("none", "tiles")) == "tiles"
    with pytest.raises(ValueError, match="kind must be 'none', 'tiles' or 'voxels', got 'spiral'"):
        V.check_choice("kind", "spiral", ("none", "tiles", "voxels"))
    assert V.check_power_of_two("t", np.int64(64), minimum=16) == 64
    for bad in (0, 8, 96, 64.0, True):
        with pytest.raises(ValueError, match="t must be a power of 2 >= 16"):
            V.check_power_of_two("t", bad, minimum=16)
    assert V.is_power_of_two(1) and V.is_power_of_two(np.int32(256))
    assert not any(V.is_power_of_two(x) for x in (0, 3, -2, 2.0, True))


def test_check_int_tuple():
    assert V.check_int_tuple("v", [4, np.int64(6), 8], length=3) == (4, 6, 8)
    assert V.check_int_tuple("s", (), minimum=0) == ()
    assert V.check_int_tuple("v", np.array([1, 2])) == (1, 2)
    with pytest.raises(ValueError, match=r"v must be a tuple of 3 positive integers, got \(4, 6\)"):
        V.check_int_tuple("v", (4, 6), length=3)
    with pytest.raises(ValueError, match="s must be a tuple of non-negative integers"):
        V.check_int_tuple("s", (0, -1), minimum=0)
    for bad in ((1, 2.0), (1, True), "12", 3, None):
        with pytest.raises(ValueError, match="v must be a tuple of"):
            V.check_int_tuple("v", bad)


@dataclasses.dataclass(frozen=True)
class _Section:
    size: int = V.field(8, check=V.positive_int)
    shape: tuple[int, ...] = V.field((1, 2), check=functools.partial(V.check_int_tuple, length=2))
    limit: int | None = V.field(None, check=V.optional(V.non_negative_int))
    ratio: float = V.field(0.5, check=V.check_fraction)
    note: str = "unchecked"

    def __post_init__(self):
        V.validate_fields(self, prefix="section.")


def test_field_and_validate_fields_normalise_frozen_dataclasses():
    s = _Section(size=np.int64(4), shape=[3, 5], limit=None, ratio=1)
    assert s.shape == (3, 5) and type(s.size) is int and s.ratio == 1.0 and s.limit is None
    assert hash(s) == hash(_Section(size=4, shape=(3, 5), ratio=1.0))  # a list became a hashable tuple
    assert _Section(limit=np.int32(0)).limit == 0
    with pytest.raises(ValueError, match="section.size must be a positive integer, got 0"):
        _Section(size=0)
    with pytest.raises(ValueError, match="section.limit must be a non-negative integer, got -2"):
        _Section(limit=-2)
    with pytest.raises(ValueError, match=r"section.shape must be a tuple of 2 positive integers"):
        _Section(shape=[1, 2, 3])
    with pytest.raises(ValueError, match=r"section.ratio must be a number in \[0, 1\]"):
        dataclasses.replace(_Section(), ratio=2.0)
    assert [f.name for f in dataclasses.fields(_Section) if f.metadata] == ["size", "shape", "limit", "ratio"]


def test_optional_and_mutable_dataclasses():
    assert V.optional(V.positive_int)("n", None) is None
    assert V.optional(V.positive_int)("n", np.int64(2)) == 2
    with pytest.raises(ValueError, match="n must be a positive integer"):
        V.optional(V.positive_int)("n", 0)

    @dataclasses.dataclass
    class Plain:
        xs: tuple = V.field(check=V.check_int_tuple)  # no default: a required field

    p = Plain([1, 2])
    V.validate_fields(p)
    assert p.xs == (1, 2)
    with pytest.raises(TypeError, match="dataclass instance"):
        V.validate_fields(Plain)


def test_validation_is_a_leaf_module():
    """It imports nothing from chipmunk_jax, so the kernels (which import nothing else of the package) can use it."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(V))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("chipmunk_jax")], imported
