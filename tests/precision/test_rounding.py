"""round_to: exact emulation, bit for bit against torch's casts and against an exact reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynomp.precision import FORMATS, is_representable, round_to
from tests.precision.conftest import assert_bitwise_equal
from tests.precision.reference import reference_round

TORCH_CASTS = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8-e4m3": torch.float8_e4m3fn,
    "fp8-e5m2": torch.float8_e5m2,
}

EDGE_VALUES = [
    65504.0, 65519.99, 65520.0, 1e5, -1e5, -65504.0, -65520.0,
    2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-24,  # fp16 subnormal edges
    2.0**-133, 2.0**-134, 1.5 * 2.0**-134, 2.0**-126,  # bf16 subnormal edges
    1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8,  # exact ties
    2049.0, 2051.0, 257.0, 259.0,
    448.0, 464.0, 480.0, 500.0, 57344.0, 61440.0, 65536.0,
    3.4028234e38, -3.4028234e38, 1e-45, -1e-45,
    0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 0.1, -0.3,
]


def random_bit_patterns(count: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns: every class (normals, subnormals, zeros, inf, NaN) appears."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        bits = torch.randint(-(2**31), 2**31 - 1, (count,), dtype=torch.int32, generator=generator)
        values = bits.view(torch.float32)
    else:
        bits = torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=generator)
        values = bits.view(torch.float64)
    scaled = torch.randn(count, dtype=dtype, generator=generator) * torch.exp2(
        torch.randint(-150, 20, (count,), generator=generator).to(dtype)
    )
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], dtype=dtype)
    return torch.cat([values, scaled, specials])


@pytest.mark.parametrize("name", sorted(TORCH_CASTS))
def test_float32_equals_torch_cast_on_every_class(name):
    x = random_bit_patterns(400_000, torch.float32)
    assert_bitwise_equal(round_to(x, name), x.to(TORCH_CASTS[name]).float())


@pytest.mark.parametrize("name", sorted(TORCH_CASTS))
def test_float32_equals_torch_cast_on_edge_values(name):
    x = torch.tensor(EDGE_VALUES, dtype=torch.float32)
    assert_bitwise_equal(round_to(x, name), x.to(TORCH_CASTS[name]).float())


def test_fp16_edge_values_by_hand():
    x = torch.tensor([65504.0, 65519.99, 65520.0, 1e5, -1e5, 2.0**-25, 3 * 2.0**-26])
    expected = torch.tensor([65504.0, 65504.0, math.inf, math.inf, -math.inf, 0.0, 2.0**-24])
    assert torch.equal(round_to(x, "fp16"), expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), min_size=1, max_size=64))
def test_hypothesis_float32_bits_fp16_and_bf16(patterns):
    x = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    for name in ("fp16", "bf16"):
        assert_bitwise_equal(round_to(x, name), x.to(TORCH_CASTS[name]).float())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=32))
def test_hypothesis_float32_values_fp16_and_bf16(values):
    x = torch.tensor(values, dtype=torch.float32)
    for name in ("fp16", "bf16"):
        assert_bitwise_equal(round_to(x, name), x.to(TORCH_CASTS[name]).float())


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "fp64"])
@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=True), min_size=1, max_size=16))
def test_float64_matches_exact_reference(name, values):
    # torch's float64 -> fp16/bf16 casts round twice (through float32); round_to rounds once
    fmt = FORMATS[name]
    x = torch.tensor(values, dtype=torch.float64)
    expected = torch.tensor([reference_round(v, fmt) for v in values], dtype=torch.float64)
    assert_bitwise_equal(round_to(x, name), expected)


@pytest.mark.parametrize("name", ["fp24", "tf32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2"])
def test_float32_matches_exact_reference_including_virtual_formats(name):
    fmt = FORMATS[name]
    x = torch.cat(
        [random_bit_patterns(3000, torch.float32, seed=1), torch.tensor(EDGE_VALUES)]
    )
    expected = torch.tensor([reference_round(float(v), fmt) for v in x], dtype=torch.float32)
    assert_bitwise_equal(round_to(x, name), expected)


def test_float64_to_fp16_matches_numpy_single_rounding():
    x = random_bit_patterns(200_000, torch.float64, seed=3)
    with np.errstate(over="ignore"):  # numpy warns where it overflows to inf, as it should
        expected = torch.from_numpy(x.numpy().astype(np.float16).astype(np.float64))
    assert_bitwise_equal(round_to(x, "fp16"), expected)


def test_float64_to_fp32_equals_torch_cast():
    x = random_bit_patterns(400_000, torch.float64, seed=4)
    assert_bitwise_equal(round_to(x, "fp32"), x.float().double())


def test_signed_zero_nan_and_infinity_are_kept():
    x = torch.tensor([-0.0, 0.0, math.nan, -math.inf, math.inf, -1e-30])
    y = round_to(x, "fp16")
    assert torch.signbit(y[0]) and not torch.signbit(y[1])
    assert math.isnan(y[2])
    assert y[3] == -math.inf and y[4] == math.inf
    assert y[5] == 0.0 and torch.signbit(y[5])  # underflow keeps the sign


def test_saturating_fp8_has_no_infinity():
    x = torch.tensor([1e6, -math.inf, 479.0, 481.0])
    assert round_to(x, "fp8-e4m3").tolist() == [448.0, -448.0, 448.0, 448.0]


def test_shape_dtype_and_non_contiguous_input():
    x = torch.randn(4, 5, 6, dtype=torch.float64).transpose(0, 2)
    y = round_to(x, "bf16")
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.equal(y, x.to(torch.bfloat16).double())


def test_fp64_on_float32_is_identity_and_fp32_on_float32_too():
    x = torch.randn(100)
    assert torch.equal(round_to(x, "fp64"), x)
    assert torch.equal(round_to(x, "fp32"), x)


def test_rounding_is_idempotent_and_representable():
    x = torch.randn(10_000) * 1000
    for name in ("fp24", "tf32", "bf16", "fp16"):
        once = round_to(x, name)
        assert torch.equal(round_to(once, name), once)
        assert bool(is_representable(once, name).all())
    assert not bool(is_representable(torch.tensor([1.0 + 2.0**-10]), "bf16").any())


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    generator = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # bf16 neighbours: 1 and 1 + 2^-7, P(up) = 1/8
    y = round_to(x, "bf16", "stochastic", generator=generator)
    assert set(torch.unique(y).tolist()) == {1.0, 1.0 + 2.0**-7}
    up = float((y > 1.0).double().mean())
    assert abs(up - 0.125) < 0.005
    assert abs(float(y.double().mean()) - (1.0 + 2.0**-10)) < 2e-5


def test_stochastic_rounding_in_the_subnormal_range():
    generator = torch.Generator().manual_seed(1)
    quantum = 2.0**-24
    x = torch.full((100_000,), 0.25 * quantum)  # fp16 neighbours: 0 and the smallest subnormal
    y = round_to(x, "fp16", "stochastic", generator=generator)
    assert set(torch.unique(y).tolist()) == {0.0, quantum}
    assert abs(float((y > 0).double().mean()) - 0.25) < 0.01


def test_stochastic_rounding_is_reproducible_with_a_generator_and_exact_values_stay():
    x = torch.randn(1000)
    a = round_to(x, "fp16", "stochastic", generator=torch.Generator().manual_seed(7))
    b = round_to(x, "fp16", "stochastic", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    exact = round_to(x, "fp16")
    assert torch.equal(round_to(exact, "fp16", "stochastic"), exact)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"x": torch.arange(4), "fmt": "bf16"}, "x"),
        ({"x": [1.0, 2.0], "fmt": "bf16"}, "x"),
        ({"x": torch.ones(2, dtype=torch.float16), "fmt": "bf16"}, "x"),
        ({"x": torch.ones(2), "fmt": "fp12"}, "fmt"),
        ({"x": torch.ones(2), "fmt": "bf16", "rounding": "up"}, "rounding"),
    ],
)
def test_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}: "):
        round_to(**kwargs)
