"""SyN's prepared coarse-level iteration against the general compiled path, bit for bit."""

from __future__ import annotations

import pytest
import torch

from dynomp import native
from dynomp.precision.dispatch import VirtualPrecision
from dynomp.registration.config import PrecisionConfig, quick_config
from dynomp.registration.metrics import build_loss
from dynomp.registration.pipeline import SymmetricProblem
from dynomp.registration.precision import PrecisionSetting
from dynomp.registration.pyramid import smooth
from dynomp.registration.symmetric_iteration import PreparedSymmetricIteration

pytestmark = pytest.mark.skipif(native.compiler() is None or not native.enabled(),
                                reason="no C compiler on this machine, or DYNOMP_NATIVE=0")

ARMS = {torch.float32: "fp32", torch.float64: "fp64"}


def _images(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    fixed = smooth(torch.rand(*shape, dtype=torch.float64, generator=generator) * 100.0, 1.0, dimensions=3)
    moving = torch.roll(fixed, 1, dims=0) + 2.0 * torch.rand(*shape, dtype=torch.float64, generator=generator)
    field_ = 0.4 * smooth(torch.randn(3, *shape, dtype=torch.float64, generator=generator), 1.5, dimensions=3)
    return fixed, moving, field_


def _problem(shape, dtype, *, seed=0, metric="cc", arm=None, config=None):
    fixed, moving, field_ = _images(shape, seed)
    stage = quick_config().stages[2]
    loss = build_loss(metric, fixed=fixed, moving=moving, radius=stage.cc_radius, bins=32)
    setting = PrecisionSetting(arm or ARMS[dtype], device="cpu", config=config or PrecisionConfig())
    return SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field_, moving_field=-0.5 * field_,
                            loss=loss, stage=stage, setting=setting)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 9, 7), (16, 19, 15), (5, 2, 11), (32, 38, 31)])
def test_prepared_iterations_equal_the_compiled_calls_bit_for_bit(dtype, shape):
    prepared = _problem(shape, dtype)
    general = _problem(shape, dtype)
    assert isinstance(prepared.prepared, PreparedSymmetricIteration)
    general.prepared = None
    losses = []
    for _ in range(4):
        loss, gradients = prepared.evaluate()
        expected_loss, expected = general.evaluate()
        assert loss.dtype == dtype and float(loss) == float(expected_loss)
        assert all(g.dtype == dtype and torch.equal(g, e) for g, e in zip(gradients, expected, strict=True))
        assert float(gradients[0].abs().max()) > 0
        prepared.step(gradients)
        general.step(expected)
        assert all(torch.equal(a, b) for a, b in zip(prepared.state(), general.state(), strict=True))
        losses.append(float(loss))
    # the steps descend: the correlation rises, so its negative falls
    assert losses[-1] < losses[0] < -0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_iteration_runs_where_it_applies_and_steps_aside_elsewhere(monkeypatch, dtype):
    problem = _problem((8, 9, 7), dtype)
    calls = []
    original = PreparedSymmetricIteration.evaluate
    monkeypatch.setattr(PreparedSymmetricIteration, "evaluate",
                        lambda self, *fields: calls.append(1) or original(self, *fields))
    problem.evaluate()
    assert calls == [1]
    # an emulated format rounds every torch operation: the C kernels step aside, the torch path runs
    with VirtualPrecision("bf16"):
        loss, _ = problem.evaluate()
    assert calls == [1] and torch.isfinite(loss)
    # a level of 2^17 voxels or more (the full-resolution grids): the general path
    assert _problem((64, 64, 32), dtype).prepared is None
    assert _problem((64, 64, 31), dtype).prepared is not None
    # SyN with MI, and 16-bit tensors: the general path
    assert _problem((8, 9, 7), dtype, metric="mi").prepared is None
    assert _problem((8, 9, 7), dtype, arm="bf16",
                    config=PrecisionConfig(native_formats=("fp64", "fp32", "bf16"))).prepared is None


def test_fields_the_prepared_calls_cannot_read_take_the_general_path(monkeypatch):
    problem = _problem((8, 9, 7), torch.float64)
    calls = []
    original = PreparedSymmetricIteration.evaluate
    monkeypatch.setattr(PreparedSymmetricIteration, "evaluate",
                        lambda self, *fields: calls.append(1) or original(self, *fields))
    general = _problem((8, 9, 7), torch.float64)
    general.prepared = None
    # fields set from outside: a non-contiguous view, and another format
    for fields in ((problem.fixed_field.transpose(1, 2).contiguous().transpose(1, 2), problem.moving_field),
                   (problem.fixed_field.float(), problem.moving_field.float())):
        problem.fixed_field, problem.moving_field = fields
        general.fixed_field, general.moving_field = fields
        assert not problem.prepared.accepts(problem.fixed, problem.moving, *fields)
        loss, gradients = problem.evaluate()
        expected_loss, expected = general.evaluate()
        assert float(loss) == float(expected_loss)
        assert all(torch.equal(g, e) for g, e in zip(gradients, expected, strict=True))
    assert calls == []
    # images set from outside: the prepared calls would read the ones they were prepared for
    problem = _problem((8, 9, 7), torch.float64)
    general = _problem((8, 9, 7), torch.float64, seed=1)
    general.prepared = None
    problem.fixed, problem.moving = general.fixed, general.moving
    problem.fixed_field, problem.moving_field = general.fixed_field, general.moving_field
    assert float(problem.evaluate()[0]) == float(general.evaluate()[0])
    assert calls == []


def test_a_format_change_prepares_the_iteration_again():
    problem = _problem((8, 9, 7), torch.float64)
    assert problem.prepared.dtype == torch.float64
    problem.cast(PrecisionSetting("fp32", device="cpu", config=PrecisionConfig()))
    assert problem.prepared.dtype == torch.float32
    loss, gradients = problem.evaluate()
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gradients)
