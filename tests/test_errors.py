import pytest

from viva_tensor import errors


def test_every_error_is_a_value_error():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TensorError)
        assert issubclass(cls, ValueError)


def test_dtype_error_is_also_a_type_error():
    assert issubclass(errors.DTypeError, TypeError)


def test_message_from_parts():
    e = errors.ShapeMismatch(argument="b", expected="shape (2, 3)", got=(3, 2), hint="broadcast first.")
    assert str(e) == "argument 'b': expected shape (2, 3), got (3, 2). Hint: broadcast first."
    assert e.argument == "b" and e.got == (3, 2)


def test_message_as_given():
    assert str(errors.InvalidShape("bad")) == "bad"
    assert str(errors.InvalidShape("bad.", hint="fix it.")) == "bad. Hint: fix it."


def test_size_mismatch_is_both_axis_and_shape_error():
    with pytest.raises(errors.ShapeMismatch):
        raise errors.SizeMismatch("x")
    with pytest.raises(errors.AxisError):
        raise errors.SizeMismatch("x")
