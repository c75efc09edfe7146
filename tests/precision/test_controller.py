"""PrecisionController: smoothing, format choice, native rounding, casting, master weights, resume."""

import math

import pytest
import torch

from dynomp.precision import TRACE_COLUMNS, PrecisionController, choose_format, round_to
from dynomp.precision.estimator import PMIN_CONSTANT

CUDA_LIKE = ("fp64", "fp32", "fp16", "bf16")


def descend(controller, *, steps, target, start, rate=0.2, curvature=1.0):
    """Gradient descent on f = a/2 ||theta - target||^2, observed by the controller each step."""
    theta = start.clone()
    formats = []
    for _ in range(steps):
        grad = curvature * (theta - target)
        formats.append(controller.observe([theta], [grad]))
        theta = theta - rate * grad
    return formats


def test_trace_has_one_row_per_step_with_the_documented_columns():
    controller = PrecisionController(["bf16", "fp32"], window=3)
    descend(controller, steps=6, target=torch.ones(4), start=torch.zeros(4))
    assert len(controller.trace) == 6
    assert [row["step"] for row in controller.trace] == [1, 2, 3, 4, 5, 6]
    assert all(tuple(row) == TRACE_COLUMNS for row in controller.trace)
    assert math.isnan(controller.trace[0]["pmin"])  # the secant needs two points
    assert controller.trace[0]["format"] == "fp32"


def test_pmin_follows_the_formula_and_the_window_is_a_moving_average():
    target = torch.full((3,), 10.0, dtype=torch.float64)
    controller = PrecisionController(["bf16", "fp16", "fp32", "fp64"], window=3,
                                     execution="virtual")
    descend(controller, steps=8, target=target, start=torch.zeros(3, dtype=torch.float64),
            curvature=2.0)
    for row in controller.trace[1:]:
        # gradient = 2 (theta - target): K = 2 exactly
        assert row["lipschitz"] == pytest.approx(2.0, rel=1e-9)
        expected = math.log2(PMIN_CONSTANT * 2.0 * row["param_norm"] / row["grad_norm"])
        assert row["pmin"] == pytest.approx(expected, rel=1e-9)
    pmins = [row["pmin"] for row in controller.trace[1:]]
    for index, row in enumerate(controller.trace[1:]):
        recent = pmins[max(0, index - 2) : index + 1]
        assert row["pmin_smoothed"] == pytest.approx(sum(recent) / len(recent))
        assert row["chosen_format"] == choose_format(row["pmin_smoothed"],
                                                     {"bf16", "fp16", "fp32", "fp64"},
                                                     max_abs=row["max_abs"])


def test_format_rises_as_the_descent_converges_and_the_trace_records_the_change():
    target = torch.full((8,), 3.0, dtype=torch.float64)
    controller = PrecisionController(["bf16", "fp16", "fp32", "fp64"], window=5,
                                     execution="virtual")
    formats = descend(controller, steps=60, target=target,
                      start=torch.zeros(8, dtype=torch.float64), rate=0.3)
    order = ["bf16", "fp16", "fp32", "fp64"]
    ranks = [order.index(f) for f in formats[1:]]
    assert ranks == sorted(ranks)  # converging needs ever more bits here
    assert {"bf16", "fp16", "fp32", "fp64"} <= set(formats)


def test_native_execution_rounds_a_virtual_choice_up_to_what_the_device_computes_in():
    kwargs = dict(steps=12, target=torch.ones(4) * 5, start=torch.zeros(4), rate=0.1)
    virtual = PrecisionController(["bf16", "fp32"], window=2, execution="virtual")
    cpu = PrecisionController(["bf16", "fp32"], window=2, execution="native", device="cpu")
    gpu_like = PrecisionController(["bf16", "fp32"], window=2, native_formats=CUDA_LIKE)
    descend(virtual, **kwargs)
    descend(cpu, **kwargs)
    descend(gpu_like, **kwargs)
    assert "bf16" in [row["format"] for row in virtual.trace]
    assert [row["chosen_format"] for row in cpu.trace] == [row["format"] for row in virtual.trace]
    assert {row["format"] for row in cpu.trace} == {"fp32"}
    assert [row["format"] for row in gpu_like.trace] == [row["format"] for row in virtual.trace]


def test_range_check_skips_formats_too_narrow_for_the_state():
    controller = PrecisionController(["fp16", "fp24", "fp32"], window=1, execution="virtual")
    big = torch.full((4,), 1e5)
    controller.observe([big], [torch.ones(4)])
    assert controller.observe([big * 1.001], [torch.full((4,), 1.0001)]) == "fp24"


def test_each_instance_owns_its_window():
    first = PrecisionController(["bf16", "fp16", "fp32", "fp64"], window=5, execution="virtual")
    second = PrecisionController(["bf16", "fp16", "fp32", "fp64"], window=5, execution="virtual")
    descend(first, steps=40, target=torch.full((4,), 3.0, dtype=torch.float64),
            start=torch.zeros(4, dtype=torch.float64), rate=0.3)
    descend(second, steps=3, target=torch.full((4,), 3.0, dtype=torch.float64),
            start=torch.zeros(4, dtype=torch.float64), rate=0.3)
    assert len(second.pmin_window) == 2
    assert second.trace[-1]["pmin_smoothed"] == pytest.approx(
        sum(row["pmin"] for row in second.trace[1:]) / 2
    )
    assert first.pmin_window is not second.pmin_window


def test_zero_gradient_keeps_the_format():
    controller = PrecisionController(["bf16", "fp32"], window=1, execution="virtual")
    controller.observe([torch.zeros(3)], [torch.ones(3)])
    fmt = controller.observe([torch.ones(3)], [torch.full((3,), 0.5)])
    assert controller.observe([torch.ones(3) * 2], [torch.zeros(3)]) == fmt
    assert math.isnan(controller.trace[-1]["pmin"])


def test_a_diverging_state_is_observed_without_raising():
    controller = PrecisionController(["bf16", "fp32"], window=2, execution="virtual")
    controller.observe([torch.zeros(3)], [torch.ones(3)])
    fmt = controller.observe([torch.ones(3)], [torch.full((3,), 0.5)])
    nan = torch.full((3,), math.nan)
    assert controller.observe([nan], [nan]) == fmt
    assert math.isnan(controller.trace[-1]["pmin"]) and math.isnan(controller.trace[-1]["max_abs"])
    assert controller.observe([torch.full((3,), math.inf)], [torch.ones(3)]) == "fp64"


def test_resume_from_state_dict_reproduces_the_uninterrupted_trace():
    kwargs = dict(target=torch.full((5,), 2.0), start=torch.zeros(5), rate=0.25)
    whole = PrecisionController(window=3, execution="virtual")
    descend(whole, steps=10, **kwargs)
    first_half = PrecisionController(window=3, execution="virtual")
    theta = kwargs["start"].clone()
    for _ in range(5):
        grad = theta - kwargs["target"]
        first_half.observe([theta], [grad])
        theta = theta - 0.25 * grad
    resumed = PrecisionController(window=3, execution="virtual")
    resumed.load_state_dict(first_half.state_dict())
    for _ in range(5):
        grad = theta - kwargs["target"]
        resumed.observe([theta], [grad])
        theta = theta - 0.25 * grad
    assert len(resumed.trace) == len(whole.trace) == 10
    for resumed_row, whole_row in zip(resumed.trace, whole.trace, strict=True):
        for key in TRACE_COLUMNS:
            a, b = resumed_row[key], whole_row[key]
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), key


def make_model_and_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_apply_casts_module_and_optimizer_state_in_native_mode():
    model, optimizer = make_model_and_adam()
    controller = PrecisionController(native_formats=CUDA_LIKE)
    controller.apply(model, optimizer, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == torch.bfloat16
        assert state["exp_avg_sq"].dtype == torch.bfloat16
    model(torch.randn(2, 6, dtype=torch.bfloat16)).sum().backward()  # still trains
    optimizer.step()
    controller.apply(model, optimizer, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_apply_rounds_values_in_virtual_mode():
    model, optimizer = make_model_and_adam()
    controller = PrecisionController(execution="virtual")
    controller.apply(model, optimizer, "bf16")
    for parameter in model.parameters():
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter, round_to(parameter.detach(), "bf16"))
    for state in optimizer.state.values():
        assert torch.equal(state["exp_avg"], round_to(state["exp_avg"], "bf16"))
    batch = controller.cast(torch.randn(3, 6))
    assert torch.equal(batch, round_to(batch, "bf16"))
    with controller.context():
        out = model(batch)
    assert torch.equal(out, round_to(out, "bf16"))


def test_master_weights_keep_updates_that_bf16_would_lose():
    weight = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        weight.weight.fill_(1.0)
    optimizer = torch.optim.SGD(weight.parameters(), lr=1e-4)
    controller = PrecisionController(execution="virtual")
    controller.apply(weight, optimizer, "bf16", master_weights=True)
    for _ in range(100):
        weight.weight.grad = torch.ones_like(weight.weight)
        controller.optimizer_step(optimizer)
    master = optimizer.param_groups[0]["params"][0]
    assert float(master.detach()) == pytest.approx(1.0 - 100 * 1e-4, rel=1e-5)
    assert float(weight.weight.detach()) == float(round_to(master.detach(), "bf16"))
    assert float(weight.weight.detach()) < 1.0  # the sum of updates shows; each alone rounds away

    plain = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        plain.weight.fill_(1.0)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=1e-4)
    plain_controller = PrecisionController(execution="virtual")
    plain_controller.apply(plain, plain_optimizer, "bf16")
    for _ in range(100):
        plain.weight.grad = torch.ones_like(plain.weight)
        plain_controller.optimizer_step(plain_optimizer)
    assert float(plain.weight.detach()) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"formats": ["bf16", "fp12"]}, "formats"),
        ({"formats": "bf16"}, "formats"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"execution": "fast"}, "execution"),
        ({"rounding": "up"}, "rounding"),
        ({"initial_format": "fp128"}, "initial_format"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        PrecisionController(**kwargs)


def test_observe_rejects_mismatched_shapes_and_integer_tensors():
    controller = PrecisionController()
    with pytest.raises(ValueError, match="^gradients"):
        controller.observe([torch.ones(3)], [torch.ones(4)])
    with pytest.raises(ValueError, match="^parameters"):
        controller.observe([torch.arange(3)], [torch.ones(3)])
    controller.observe([torch.ones(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="^parameters: changed shape"):
        controller.observe([torch.ones(4)], [torch.ones(4)])


def test_observe_max_abs_keeps_formats_whose_range_is_too_small_out():
    parameters = [torch.tensor([1.0, 2.0, 3.0])]
    controller = PrecisionController(["bf16", "fp16", "fp32"], window=1, execution="virtual",
                                     initial_format="fp32")
    controller.observe(parameters, [torch.tensor([1.0, 1.0, 1.0])])
    # p_min of this step is tiny, so fp16's 11 bits would do; a 1e6 intermediate rules fp16 out
    moved = [parameters[0] - 0.1]
    gradient = [torch.tensor([0.9, 0.9, 0.9])]
    assert controller.observe(moved, gradient, max_abs=10.0) in ("bf16", "fp16")
    ruled_out = PrecisionController(["fp16", "fp32"], window=1, execution="virtual",
                                    initial_format="fp32")
    ruled_out.observe(parameters, [torch.tensor([1.0, 1.0, 1.0])])
    assert ruled_out.observe(moved, gradient, max_abs=1e6) == "fp32"
    assert ruled_out.trace[-1]["max_abs"] == 1e6
    allowed = PrecisionController(["fp16", "fp32"], window=1, execution="virtual",
                                  initial_format="fp32")
    allowed.observe(parameters, [torch.tensor([1.0, 1.0, 1.0])])
    assert allowed.observe(moved, gradient, max_abs=100.0) == "fp16"


def test_the_previous_step_is_kept_in_the_controllers_own_copies_without_new_ones():
    generator = torch.Generator().manual_seed(5)
    steps = [(torch.randn(2, 50, generator=generator), torch.randn(2, 50, generator=generator)) for _ in range(4)]
    controller = PrecisionController(window=2, execution="native")
    controller.observe([steps[0][0]], [steps[0][1]])
    copies = (controller._previous_parameters[0], controller._previous_gradients[0])
    assert copies[0] is not steps[0][0] and torch.equal(copies[0], steps[0][0])
    saved = controller.state_dict()
    for theta, grad in steps[1:]:
        controller.observe([theta], [grad])
        # the same buffers, overwritten with the latest step
        assert controller._previous_parameters[0] is copies[0] and torch.equal(copies[0], theta)
        assert controller._previous_gradients[0] is copies[1] and torch.equal(copies[1], grad)
    # a checkpoint holds copies, untouched by the steps after it
    assert torch.equal(saved["previous_parameters"][0], steps[0][0])
    # the statistics equal the ones from fresh copies at every step
    fresh = PrecisionController(window=2, execution="native")
    for theta, grad in steps:
        fresh.observe([theta], [grad])
        fresh._previous_parameters = [fresh._previous_parameters[0].clone()]
        fresh._previous_gradients = [fresh._previous_gradients[0].clone()]
    for ours, theirs in zip(controller.trace, fresh.trace, strict=True):
        for key in ("pmin", "lipschitz", "grad_norm", "param_norm"):
            assert ours[key] == theirs[key] or (math.isnan(ours[key]) and math.isnan(theirs[key])), key
    assert not math.isnan(controller.trace[-1]["pmin"])
