"""choose_format: the cheapest allowed format precise enough and wide enough."""

import math

import pytest

from dynomp.precision import choose_format

ALLOWED = {"bf16", "fp16", "fp24", "fp32"}


@pytest.mark.parametrize(
    ("pmin", "max_abs", "expected"),
    [
        (7.5, None, "bf16"),
        (9, None, "fp16"),
        (9, 1e5, "fp24"),
        (12, None, "fp24"),
        (17, None, "fp32"),
        (24, None, "fp32"),
        (30, None, "fp64"),
        (0.0, None, "bf16"),
        (-3.0, None, "bf16"),
        (7.5, 1e39, "fp64"),
        (7.5, math.inf, "fp64"),
    ],
)
def test_examples(pmin, max_abs, expected):
    assert choose_format(pmin, ALLOWED, max_abs=max_abs) == expected


def test_fp64_when_allowed_and_needed():
    assert choose_format(30, ALLOWED | {"fp64"}) == "fp64"
    assert choose_format(60, ALLOWED | {"fp64"}) == "fp64"


def test_fewest_bits_first_then_smaller_precision():
    every = ["fp64", "fp32", "fp24", "tf32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2"]
    assert choose_format(2.5, every) == "fp8-e5m2"
    assert choose_format(3.5, every) == "fp8-e4m3"
    assert choose_format(4.5, every) == "bf16"
    assert choose_format(10.5, every) == "fp16"
    assert choose_format(10.5, every, max_abs=1e6) == "tf32"  # 19 bits, fp32 range


def test_order_of_the_allowed_set_does_not_matter():
    assert choose_format(9, ["fp32", "fp16", "bf16"]) == choose_format(9, ["bf16", "fp16", "fp32"])


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ((9, ["bf16", "fp12"]), "formats"),
        ((9, []), "formats"),
        ((9, "bf16"), "formats"),
        ((math.nan, ["bf16"]), "pmin"),
        (("9", ["bf16"]), "pmin"),
    ],
)
def test_bad_input_names_the_argument(arguments, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        choose_format(*arguments)
