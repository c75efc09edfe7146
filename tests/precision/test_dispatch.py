"""VirtualPrecision: any PyTorch code runs with every op's output rounded to the format."""

import pytest
import torch
import torch.nn.functional as F

from dynomp.precision import VirtualPrecision, is_representable, round_to


def chain(x, w1, w2, k1, b1, k2, round_each=lambda t: t):
    """Matmuls then 3D convolutions, with `round_each` after every op."""
    y = round_each(x @ w1)
    y = round_each(y @ w2)
    y = y.reshape(1, 1, 4, 4, 4)
    y = round_each(F.conv3d(y, k1, b1, padding=1))
    y = round_each(F.relu(y))
    y = round_each(F.conv3d(y, k2, padding=1))
    return round_each(y * 0.5)


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "tf32", "fp24", "fp8-e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chain_under_the_mode_equals_round_to_after_each_op(fmt, dtype):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    inputs = (randn(8, 16), randn(16, 16), randn(16, 8), randn(3, 1, 3, 3, 3), randn(3),
              randn(2, 3, 3, 3, 3))
    expected = chain(*inputs, round_each=lambda t: round_to(t, fmt))
    with VirtualPrecision(fmt):
        actual = chain(*inputs)
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)
    plain = chain(*inputs)
    assert not torch.equal(plain, expected)  # the emulation really changed the result


def test_backward_pass_is_emulated_too():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 1, 3, padding=1))
    x = torch.randn(2, 1, 8, 8, 8)
    with VirtualPrecision("bf16"):
        loss = net(x).square().mean()
        loss.backward()
    assert bool(is_representable(loss.detach(), "bf16"))
    for parameter in net.parameters():
        assert bool(is_representable(parameter.grad, "bf16").all())
    assert not all(bool(is_representable(p.detach(), "bf16").all()) for p in net.parameters())


def test_in_place_ops_are_rounded_in_place():
    x = torch.ones(4)
    with VirtualPrecision("bf16"):
        x.add_(2.0**-10)  # lost in bf16
        y = torch.zeros(4)
        torch.add(torch.ones(4), 2.0**-10, out=y)
    assert torch.equal(x, torch.ones(4))
    assert torch.equal(y, torch.ones(4))


def test_round_to_inside_the_mode_is_still_exact():
    x = torch.tensor([0.3, 1e-6, -7.0, 70000.0, 1.0 + 2.0**-9])
    expected = {name: round_to(x, name) for name in ("fp16", "bf16", "fp8-e4m3")}
    with VirtualPrecision("fp16"):
        inside = {name: round_to(x, name) for name in expected}
    for name in expected:
        assert torch.equal(inside[name], expected[name]), name


def test_other_dtypes_pass_through():
    with VirtualPrecision("fp8-e4m3"):
        integers = torch.arange(1000) * 3
        half = torch.full((3,), 1.0 + 2.0**-10, dtype=torch.float16) * 1
    assert integers[-1] == 2997
    assert half.dtype == torch.float16 and float(half[0]) == 1.0 + 2.0**-10


def test_stochastic_mode_is_reproducible_with_a_generator():
    x = torch.randn(1000)
    with VirtualPrecision("bf16", "stochastic", torch.Generator().manual_seed(3)):
        a = x * 1.0001
    with VirtualPrecision("bf16", "stochastic", torch.Generator().manual_seed(3)):
        b = x * 1.0001
    assert torch.equal(a, b)
    assert bool(is_representable(a, "bf16").all())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="^fmt: "):
        VirtualPrecision("fp7")
    with pytest.raises(ValueError, match="^rounding: "):
        VirtualPrecision("bf16", "down")


def test_in_single_precision_runs_forward_and_backward_unrounded():
    from dynomp.precision.dispatch import in_single_precision

    generator = torch.Generator().manual_seed(3)
    # fp16 values (so that a natively fp16 copy holds the same numbers)
    values = round_to(torch.rand(1000, generator=generator) * 1e-3, "fp16")

    def function(t):
        # squares of 1e-3 are subnormal in fp16, and the gradient divides by their small sum
        return torch.log((t * t).sum())

    exact = values.clone().requires_grad_(True)
    expected = function(exact)
    (expected_gradient,) = torch.autograd.grad(expected, exact)
    plain = values.clone().requires_grad_(True)
    wrapped = values.clone().requires_grad_(True)
    wide = values.clone().requires_grad_(True)
    with VirtualPrecision("fp16"):
        rounded = function(plain)
        (rounded_gradient,) = torch.autograd.grad(rounded, plain)
        value = in_single_precision(function, wrapped)
        (gradient,) = torch.autograd.grad(value, wrapped)
        (wide_gradient,) = torch.autograd.grad(in_single_precision(function, wide, rounded=(False,)), wide)
    # rounded after every op the value moves; wrapped, both passes equal the fp32 ones exactly, and
    # the gradient is rounded to fp16 once, as a natively fp16 input's gradient is on its way back
    # through the widening conversion; left unrounded for an input that is fp32 natively too
    assert float(rounded) != float(expected) and not torch.equal(rounded_gradient, expected_gradient)
    assert float(value) == float(expected)
    assert not torch.equal(gradient, expected_gradient)
    assert torch.equal(gradient, round_to(expected_gradient, "fp16"))
    assert torch.equal(wide_gradient, expected_gradient)
    native = values.half().requires_grad_(True)
    (native_gradient,) = torch.autograd.grad(in_single_precision(function, native), native)
    assert native_gradient.dtype == torch.float16
    assert torch.equal(native_gradient.float(), gradient)
    with pytest.raises(ValueError, match="rounded: 2 flags for 1 tensors"):
        in_single_precision(function, wide, rounded=(True, False))


def test_in_single_precision_widens_half_inputs_and_returns_their_dtype():
    from dynomp.precision.dispatch import in_single_precision

    half = torch.full((3000,), 1.0, dtype=torch.float16, requires_grad=True)
    total = in_single_precision(torch.sum, half)
    # 3000 ones: an fp16 running sum would stop at 2048; the fp32 sum is exact
    assert total.dtype == torch.float32 and float(total) == 3000.0
    (gradient,) = torch.autograd.grad(total * 0.5, half)
    assert gradient.dtype == torch.float16 and torch.all(gradient == 0.5)
