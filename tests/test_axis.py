"""Tests of viva_tensor.axis: the Gleam semantic axis names, and name validation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viva_tensor import axis, errors

# The Gleam ``Axis`` union, in its order: Batch | Seq | Feature | Height | Width | Channel | Input |
# Output | Head | Embed (then Named(String) and Anon, which are any string and None here).
GLEAM_ORDER = ["batch", "seq", "feature", "height", "width", "channel", "input", "output", "head", "embed"]


def test_semantic_names_are_the_gleam_ones_in_order():
    assert list(axis.SEMANTIC) == GLEAM_ORDER
    for name in GLEAM_ORDER:
        assert getattr(axis, name) == name


def test_every_public_name_exists():
    for name in axis.__all__:
        assert hasattr(axis, name), name


@pytest.mark.parametrize("name", GLEAM_ORDER)
def test_is_semantic_for_each_gleam_name(name):
    assert axis.is_semantic(name)
    assert not axis.is_anonymous(name)
    assert axis.validate_name(name) == name


@pytest.mark.parametrize("name", ["my_axis", "Batch", "SEQ", "", None, 3])
def test_is_semantic_is_false_for_anything_else(name):
    assert not axis.is_semantic(name)


def test_anonymous_axis_is_none():
    assert axis.is_anonymous(None)
    assert axis.validate_name(None) is None
    assert not axis.is_anonymous("")


@pytest.mark.parametrize("bad", ["", 0, 1.5, b"seq", ("seq",), True])
def test_validate_name_rejects(bad):
    with pytest.raises(errors.AxisError, match=r"argument 'name': expected a non-empty string or None, got "):
        axis.validate_name(bad)


def test_validate_name_names_the_argument():
    with pytest.raises(errors.AxisError, match=r"argument 'axes': expected a non-empty string or None, got 7"):
        axis.validate_name(7, argument="axes")


def test_validate_names():
    assert axis.validate_names(["batch", None, None, "embed"]) == ("batch", None, None, "embed")
    assert axis.validate_names(("seq",)) == ("seq",)
    assert axis.validate_names([]) == ()
    assert axis.validate_names(iter(["a", "b"])) == ("a", "b")


def test_validate_names_rejects_duplicates():
    with pytest.raises(errors.DuplicateAxis, match=r"argument 'names': expected unique axis names, got 'seq' twice"):
        axis.validate_names(["seq", "batch", "seq"])
    assert issubclass(errors.DuplicateAxis, errors.AxisError)


def test_validate_names_rejects_a_bare_string():
    with pytest.raises(errors.AxisError, match=r"expected a sequence of axis names, got the string 'seq'"):
        axis.validate_names("seq")


def test_validate_names_rejects_a_bad_member():
    with pytest.raises(errors.AxisError, match=r"argument 'axes': expected a non-empty string or None, got 3"):
        axis.validate_names(["seq", 3], argument="axes")


names = st.one_of(st.none(), st.text(min_size=1, max_size=8))


@given(st.lists(names, max_size=6))
def test_validate_names_accepts_iff_strings_are_unique(ns):
    strings = [n for n in ns if n is not None]
    if len(strings) == len(set(strings)):
        assert axis.validate_names(ns) == tuple(ns)
    else:
        with pytest.raises(errors.DuplicateAxis):
            axis.validate_names(ns)


@given(st.text(min_size=1, max_size=12))
def test_any_non_empty_string_is_a_valid_axis_name(name):
    assert axis.validate_name(name) == name
    assert axis.is_semantic(name) == (name in GLEAM_ORDER)
