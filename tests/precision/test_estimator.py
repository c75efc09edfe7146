"""estimate_pmin: the formula of the method, its guards, and its argument checks."""

import math

import pytest
import torch

from dynomp.precision import estimate_lipschitz, estimate_pmin
from dynomp.precision.estimator import PMIN_CONSTANT

CURVATURE = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)


def gradient(theta):
    return CURVATURE * theta  # f = 1/2 sum a_i theta_i^2


def test_secant_recovers_the_curvature_along_an_eigenvector():
    previous = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    theta = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    lipschitz = estimate_lipschitz(theta, gradient(theta), previous, gradient(previous))
    assert lipschitz == pytest.approx(4.0, rel=1e-12)


def test_pmin_is_the_formula_of_the_method():
    previous = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    theta = torch.tensor([0.9, 1.9, 2.5], dtype=torch.float64)
    g, g_prev = gradient(theta), gradient(previous)
    lipschitz = float((g - g_prev).norm() / (theta - previous).norm())
    expected = math.log2(PMIN_CONSTANT * lipschitz * float(theta.norm()) / float(g.norm()))
    assert PMIN_CONSTANT == pytest.approx(4 + 3 * math.sqrt(2))
    assert estimate_pmin(theta, g, previous, g_prev) == pytest.approx(expected, rel=1e-12)


def test_sequences_of_tensors_equal_their_concatenation():
    parts = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    previous = [p + 0.1 * torch.randn_like(p) for p in parts]
    grads = [torch.randn_like(p) for p in parts]
    prev_grads = [torch.randn_like(p) for p in parts]

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    assert estimate_pmin(parts, grads, previous, prev_grads) == pytest.approx(
        estimate_pmin(flat(parts), flat(grads), flat(previous), flat(prev_grads)), rel=1e-12
    )


def test_tiny_step_keeps_the_previous_lipschitz_constant():
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g = gradient(theta)
    with_previous = estimate_pmin(theta, g, theta.clone(), g * 1.5, previous_lipschitz=2.0)
    expected = math.log2(PMIN_CONSTANT * 2.0 * float(theta.norm()) / float(g.norm()))
    assert with_previous == pytest.approx(expected)
    assert estimate_pmin(theta, g, theta.clone(), g * 1.5, previous_pmin=11.0) == 11.0


def test_zero_gradient_means_converged_and_stays():
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    result = estimate_pmin(theta, zero, theta + 1, torch.ones(2, dtype=torch.float64),
                           previous_pmin=9.5)
    assert result == 9.5


def test_identical_gradients_clip_at_zero_instead_of_minus_infinity():
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g = torch.ones(2, dtype=torch.float64)
    assert estimate_pmin(theta, g, theta + 1, g.clone()) == 0.0


def test_fp16_state_does_not_overflow_the_norms():
    theta = torch.full((1000,), 60000.0, dtype=torch.float16)
    previous = torch.full((1000,), 50000.0, dtype=torch.float16)
    g = torch.full((1000,), 30000.0, dtype=torch.float16)
    g_prev = torch.full((1000,), 10000.0, dtype=torch.float16)
    value = estimate_pmin(theta, g, previous, g_prev)
    assert math.isfinite(value)
    assert value == pytest.approx(math.log2(PMIN_CONSTANT * 2.0 * 2.0), rel=1e-3)


def test_float32_norms_neither_overflow_nor_underflow():
    from dynomp.precision.estimator import difference_norm, global_norm, step_statistics

    # squares of 1e30 overflow float32 and squares of 1e-30 underflow it; the norms are still exact
    large = torch.full((100,), 1e30, dtype=torch.float32)
    small = torch.full((100,), 1e-30, dtype=torch.float32)
    assert global_norm([large]) == pytest.approx(1e31, rel=1e-6)
    assert global_norm([small]) == pytest.approx(1e-29, rel=1e-6)
    assert difference_norm([large], [-large]) == pytest.approx(2e31, rel=1e-6)
    stats = step_statistics([large, small], [small, small], [large * 0.5, small], [small * 3, small],
                            with_max_abs=True)
    assert stats["param_norm"] == pytest.approx(1e31, rel=1e-6)
    assert stats["grad_norm"] == pytest.approx(math.sqrt(2) * 1e-29, rel=1e-6)
    assert stats["step_norm"] == pytest.approx(0.5e31, rel=1e-6)
    assert stats["grad_change_norm"] == pytest.approx(2e-29, rel=1e-6)
    assert stats["max_abs"] == pytest.approx(1e30, rel=1e-6)
    # a zero norm stays zero, and a NaN stays NaN (a diverging state)
    assert global_norm([torch.zeros(5)]) == 0.0
    assert math.isnan(global_norm([torch.tensor([1.0, math.nan])]))


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ((torch.ones(3), torch.ones(4), torch.ones(3), torch.ones(3)), "grad"),
        ((torch.ones(3), torch.ones(3), torch.ones(2), torch.ones(3)), "prev_theta"),
        ((torch.arange(3), torch.ones(3), torch.ones(3), torch.ones(3)), "theta"),
        (([torch.ones(3)], [torch.ones(3), torch.ones(1)], [torch.ones(3)], [torch.ones(3)]), "grad"),
        (([], [], [], []), "theta"),
    ],
)
def test_bad_input_names_the_argument(arguments, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        estimate_pmin(*arguments)


def test_step_statistics_keep_overwrites_the_previous_step_in_the_same_pass():
    from dynomp.precision.estimator import step_statistics

    theta, grad = [torch.tensor([3.0, 4.0])], [torch.tensor([1.0, -2.0])]
    previous_theta, previous_grad = [torch.tensor([0.0, 4.0])], [torch.tensor([1.0, 0.0])]
    stats = step_statistics(theta, grad, previous_theta, previous_grad, with_max_abs=True, keep=True)
    assert (stats["param_norm"], stats["grad_norm"]) == (5.0, pytest.approx(math.sqrt(5)))
    assert (stats["step_norm"], stats["grad_change_norm"], stats["max_abs"]) == (3.0, 2.0, 4.0)
    assert stats["kept"] == 1.0
    assert torch.equal(previous_theta[0], theta[0]) and torch.equal(previous_grad[0], grad[0])
    # a previous step in another dtype is not the caller's to overwrite: nothing is written
    other = [torch.tensor([0.0, 4.0], dtype=torch.float64)]
    again = step_statistics(theta, grad, other, [grad[0].double()], keep=True)
    assert again["kept"] == 0.0 and again["step_norm"] == 3.0
    assert torch.equal(other[0], torch.tensor([0.0, 4.0], dtype=torch.float64))
    # without keep, nothing is written either
    unchanged = [torch.tensor([0.0, 4.0])]
    assert step_statistics(theta, grad, unchanged, [grad[0].clone()])["kept"] == 0.0
    assert torch.equal(unchanged[0], torch.tensor([0.0, 4.0]))


def test_load_kernels_readies_the_statistics_for_every_dtype_pair():
    from dynomp.precision.estimator import _sums, load_kernels

    load_kernels()
    # one compiled version per (state, previous) dtype pair, the keep flag included
    assert len(_sums.signatures) >= 4
    assert {(str(s[0].dtype), str(s[1].dtype)) for s in _sums.signatures} >= {
        ("float32", "float32"), ("float64", "float64"), ("float32", "float64"), ("float64", "float32")}
    from dynomp import native
    from dynomp.precision.estimator import native_statistics

    if native.compiler() is not None and native.enabled():
        assert set(native_statistics()) == {(a, b) for a in (torch.float32, torch.float64)
                                            for b in (torch.float32, torch.float64)}


@pytest.mark.parametrize("first", [torch.float32, torch.float64])
@pytest.mark.parametrize("second", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [37, 200_003])  # one thread; split over threads with a ragged tail
def test_c_statistics_give_the_numba_kernels_numbers(monkeypatch, first, second, count):
    from dynomp import native
    from dynomp.precision import estimator

    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    generator = torch.Generator().manual_seed(count)
    a = (torch.randn(count, dtype=torch.float64, generator=generator) * 3).to(first)
    b = (a.double() + torch.randn(count, dtype=torch.float64, generator=generator) * 0.01).to(second)
    results = []
    for kernels in (None, {}):  # None: load the C kernels; {}: none, so the numba kernel runs
        monkeypatch.setattr(estimator, "_native_statistics", kernels)
        results.append(estimator._compiled_sums(a, b.clone()))
    (squares, differences, largest), (_, _, numba_largest) = results
    exact = (a.double() ** 2).sum(), ((a.double() - b.double()) ** 2).sum(), a.double().abs().max()
    for ours, theirs, reference in zip(results[0], results[1], exact, strict=True):
        assert ours == pytest.approx(float(reference), rel=1e-12)
        assert ours == pytest.approx(theirs, rel=1e-12)
    assert largest == numba_largest == float(exact[2])
    assert differences > 0 and squares > 0
    # keep: b becomes a in the same pass (same dtype only), and the sums are those of the old b
    if first == second:
        monkeypatch.setattr(estimator, "_native_statistics", None)
        kept = b.clone()
        assert estimator._compiled_sums(a, kept, keep=True)[1] == pytest.approx(differences, rel=1e-12)
        assert torch.equal(kept, a)
    # a NaN or an infinity anywhere makes the squares non-finite, as the divergence check needs
    for bad in (math.nan, math.inf):
        broken = a.clone()
        broken[count // 2] = bad
        assert not math.isfinite(estimator._compiled_sums(broken, b)[0])


@pytest.mark.parametrize("first", [torch.float32, torch.float64])
@pytest.mark.parametrize("second", [torch.float32, torch.float64])
def test_a_few_elements_are_summed_in_python_as_the_c_kernel_sums_them(monkeypatch, first, second):
    """Below 16 elements (a rigid or affine parameter vector) the sums are Python floats: the same
    numbers as the C kernel's bit for bit, the same NaN rule, and `keep` copies a into b."""
    from dynomp import native
    from dynomp.precision import estimator

    if native.compiler() is None or not native.enabled():
        pytest.skip("no C compiler on this machine, or DYNOMP_NATIVE=0")
    generator = torch.Generator().manual_seed(5)
    for count in (1, 6, 12, 15):
        a = (torch.randn(count, dtype=torch.float64, generator=generator) * 7).to(first)
        b = (a.double() + torch.randn(count, dtype=torch.float64, generator=generator) * 1e-3).to(second)
        python = estimator._compiled_sums(a, b)
        monkeypatch.setattr(estimator, "_PYTHON_SUMS_BELOW", 0)
        compiled = estimator._compiled_sums(a, b)
        monkeypatch.undo()
        assert python == compiled  # exact: the same additions in the same order
        assert python[0] > 0 and python[1] > 0 and python[2] == float(a.double().abs().max())
        kept = b.clone()
        assert estimator._compiled_sums(a, kept, keep=True) == python
        assert torch.equal(kept, a.to(second))
    broken = torch.tensor([1.0, math.nan, 3.0], dtype=first)
    squares, _, largest = estimator._compiled_sums(broken, None)
    assert math.isnan(squares) and math.isnan(largest)
