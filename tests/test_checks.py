"""The shared argument checks and glob layer selection."""

import math

import pytest

from compresslight.checks import (
    check_choice,
    check_int,
    check_number,
    check_patterns,
    check_ratio,
    layers_matching,
    select_layers,
)


@pytest.mark.parametrize("value", [1, 5])
def test_check_int_accepts_ints_at_or_above_minimum(value):
    check_int("n", value, 1)


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "2", None])
def test_check_int_rejects_others(value):
    with pytest.raises(ValueError, match=rf"`n` must be an int >= 1, got {value!r}\."):
        check_int("n", value, 1)


def test_check_int_with_maximum_and_optional():
    check_int("bits", 16, 2, 16)
    check_int("threads", None, 1, optional=True)
    with pytest.raises(ValueError, match=r"`bits` must be an int in \[2, 16\], got 17\."):
        check_int("bits", 17, 2, 16)
    with pytest.raises(ValueError, match=r"`threads` must be an int >= 1 or None, got 0\."):
        check_int("threads", 0, 1, optional=True)


def test_check_number_bounds():
    check_number("lr", 0.1, greater_than=0)
    check_number("lam", 0, at_least=0)
    check_number("tol", None, at_least=0, optional=True)
    with pytest.raises(ValueError, match=r"`lr` must be > 0, got 0\."):
        check_number("lr", 0, greater_than=0)
    with pytest.raises(ValueError, match=r"`lam` must be >= 0, got -1\."):
        check_number("lam", -1, at_least=0)
    with pytest.raises(ValueError, match=r"`lr` must be > 0, got nan\."):
        check_number("lr", math.nan, greater_than=0)
    with pytest.raises(ValueError, match=r"`x` must be a finite number, got True\."):
        check_number("x", True)


def test_check_ratio_ends():
    check_ratio("amount", 1.0)
    check_ratio("amount", 0.0, include_zero=True)
    with pytest.raises(ValueError, match=r"`amount` must be in \(0, 1\], got 0\."):
        check_ratio("amount", 0)
    with pytest.raises(ValueError, match=r"`confidence` must be in \(0, 1\), got 1\."):
        check_ratio("confidence", 1, include_one=False)
    with pytest.raises(ValueError, match=r"`amount` must be in \[0, 1\], got '0\.5'\."):
        check_ratio("amount", "0.5", include_zero=True)


def test_check_choice():
    check_choice("backend", "onnx", ("eager", "onnx"))
    check_choice("backend", None, ("eager", "onnx"), optional=True)
    with pytest.raises(ValueError, match=r"`backend` must be one of \['eager', 'onnx'\], got 'tvm'\."):
        check_choice("backend", "tvm", ("eager", "onnx"))
    with pytest.raises(ValueError, match=r"`backend` must be one of \['eager', 'onnx'\] or None, got 'tvm'\."):
        check_choice("backend", "tvm", ("eager", "onnx"), optional=True)


def test_check_patterns_rejects_a_bare_string_and_non_strings():
    check_patterns("layers", ["conv*", "fc"])
    with pytest.raises(ValueError, match=r"`layers` must be a list of patterns, got the string 'conv\*'\."):
        check_patterns("layers", "conv*")
    with pytest.raises(ValueError, match=r"`layers` must be a list of glob patterns \(strings\), got \[1\]\."):
        check_patterns("layers", [1])


LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]


def test_layers_matching_keeps_layer_order_and_names_the_candidates():
    assert layers_matching("ratios", "layer1.*", LAYERS) == ["layer1.0.conv1", "layer1.0.conv2"]
    with pytest.raises(
        ValueError,
        match=r"`ratios` pattern 'layer9\.\*' matches no prunable layer; prunable layers are \['conv1', .*'fc'\]\.",
    ):
        layers_matching("ratios", "layer9.*", LAYERS, kind="prunable layer")


def test_select_layers_unions_patterns_in_layer_order():
    assert select_layers("layers", ["fc", "*conv1"], LAYERS) == ["conv1", "layer1.0.conv1", "fc"]
    assert select_layers("layers", [], LAYERS) == []
    with pytest.raises(ValueError, match=r"`layers` pattern 'Conv1' matches no layer; layers are \["):
        select_layers("layers", ["conv1", "Conv1"], LAYERS)  # globs are case-sensitive
    with pytest.raises(ValueError, match=r"`layers` must be a list of patterns, got the string 'fc'"):
        select_layers("layers", "fc", LAYERS)
