"""The learning arms: dtypes actually used, the trace, the scaler across a resume, kill and resume,
divergence, and a format change under dynomp."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dynomp.cli import main
from dynomp.learning.config import load_config
from dynomp.learning.train import TRACE_COLUMNS, build_run, load_checkpoint, train
from dynomp.precision.dispatch import VirtualPrecision

TINY = {"nb_features": (4, 4, 4), "checkpoint_every": 2}
EXPECTED_DTYPES = {
    # arm: (parameters, network computation, format column)
    "fp32": ("float32", "float32", "fp32"),
    "amp": ("float32", "float16", "fp16"),
    "amp-bf16": ("float32", "bfloat16", "bf16"),
    "bf16": ("bfloat16", "bfloat16", "bf16"),
    "fp16": ("float16", "float16", "fp16"),
    "dynomp": ("float32", "float32", "fp32"),
}


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.mark.parametrize("arm", list(EXPECTED_DTYPES))
def test_each_arm_runs_in_its_dtypes(arm: str, cohort_2d: Path, tmp_path: Path) -> None:
    config = load_config(arm=arm, dim=2, steps=3, **TINY)
    result = train(config, data=cohort_2d, out=tmp_path / arm, progress=False)
    trace = pd.read_parquet(tmp_path / arm / "trace.parquet")
    assert tuple(trace.columns) == TRACE_COLUMNS
    parameters, computation, fmt = EXPECTED_DTYPES[arm]
    first = trace.iloc[0]
    assert (first.parameter_dtype, first.compute_dtype, first.format) == (
        parameters,
        computation,
        fmt,
    )
    assert first.loss_total == pytest.approx(first.loss_image + 0.01 * first.loss_regularisation)
    assert first.loss_image > 0 and first.step_seconds > 0 and first.peak_memory_bytes > 0
    if arm == "fp16":
        # Adam's eps (1e-8) is 0 in float16 and so is 0.001 g^2: the update divides by zero, and
        # the pure fp16 arm diverges at step 2 on this data
        assert result.status == "diverged at step 2" and result.exit_code == 0
        assert math.isnan(trace.iloc[-1].loss_total)
        assert not (tmp_path / arm / "model.pt").exists()
        return
    assert result.status == "completed" and list(trace.step) == [1, 2, 3]
    assert (trace.loss_scale == 65536.0).all() if arm == "amp" else trace.loss_scale.isna().all()
    assert trace.pmin.notna().sum() == (2 if arm == "dynomp" else 0)
    assert (tmp_path / arm / "model.pt").is_file()
    metrics = json.loads((tmp_path / arm / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps_done"] == 3
    assert metrics["final_loss_total"] == pytest.approx(trace.iloc[-1].loss_total)


def test_amp_unscales_before_clipping(cohort_2d: Path, tmp_path: Path) -> None:
    reference = load_config(arm="fp32", dim=2, steps=1, **TINY)
    train(reference, data=cohort_2d, out=tmp_path / "fp32", progress=False)
    amp = load_config(arm="amp", dim=2, steps=1, clip_gradient_norm=1e-3, **TINY)
    train(amp, data=cohort_2d, out=tmp_path / "amp", progress=False)
    fp32_norm = pd.read_parquet(tmp_path / "fp32" / "trace.parquet").grad_norm[0]
    amp_norm = pd.read_parquet(tmp_path / "amp" / "trace.parquet").grad_norm[0]
    # the logged norm is the true gradient's, not 65536 times it
    assert amp_norm == pytest.approx(fp32_norm, rel=0.05)
    run = build_run(amp, cohort_2d)
    load_checkpoint(tmp_path / "amp" / "checkpoints" / "last.pt", run)
    assert run.strategy.scaler.get_scale() == 65536.0


def test_amp_scaler_state_survives_a_resume(cohort_2d: Path, tmp_path: Path) -> None:
    settings = {**TINY, "loss_scale_growth_interval": 1, "initial_loss_scale": 4.0}
    straight = load_config(arm="amp", dim=2, steps=6, **settings)
    train(straight, data=cohort_2d, out=tmp_path / "straight", progress=False)
    train(
        load_config(arm="amp", dim=2, steps=3, **settings),
        data=cohort_2d,
        out=tmp_path / "resumed",
        progress=False,
    )
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["strategy"]["scaler"]["scale"] == 32.0  # 4 doubled after each of 3 good steps
    train(straight, data=cohort_2d, out=tmp_path / "resumed", progress=False)
    expected = pd.read_parquet(tmp_path / "straight" / "trace.parquet")
    resumed = pd.read_parquet(tmp_path / "resumed" / "trace.parquet")
    assert (
        list(resumed.loss_scale)
        == list(expected.loss_scale)
        == [8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
    )
    pd.testing.assert_series_equal(resumed.loss_total, expected.loss_total)
    final_straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["model"]
    final_resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["model"]
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_divergence_is_recorded(cohort_2d: Path, tmp_path: Path) -> None:
    config = load_config(arm="fp32", dim=2, steps=5, learning_rate=1e30, **TINY)
    result = train(config, data=cohort_2d, out=tmp_path / "run", progress=False)
    assert result.status == "diverged at step 2" and result.exit_code == 0
    assert _status(tmp_path / "run")["status"] == "diverged at step 2"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged at step 2" and metrics["steps_done"] == 2
    trace = pd.read_parquet(tmp_path / "run" / "trace.parquet")
    assert list(trace.step) == [1, 2] and not math.isfinite(trace.loss_total[1])
    # the command exits 0: a diverged arm is a result, not a failed job
    (tmp_path / "blowup.yaml").write_text("learning_rate: 1.0e+30\nnb_features: [4, 4, 4]\n")
    arguments = ["train", "--arm", "fp32", "--data", str(cohort_2d), "--dim", "2", "--steps", "4"]
    arguments += ["--out", str(tmp_path / "cli"), "--config", str(tmp_path / "blowup.yaml")]
    assert main([*arguments, "--quiet"]) == 0
    assert _status(tmp_path / "cli")["status"] == "diverged at step 2"


def test_dynomp_changes_format_and_casts_everything(cohort_2d: Path, tmp_path: Path) -> None:
    # bf16 made native on purpose (torch has CPU kernels for it): the cast is a real dtype change
    config = load_config(
        arm="dynomp",
        dim=2,
        steps=4,
        formats=("bf16", "fp32"),
        native_formats=("fp32", "bf16"),
        initial_format="bf16",
        **TINY,
    )
    run = build_run(config, cohort_2d)
    assert next(run.model.parameters()).dtype == torch.bfloat16
    train(config, data=cohort_2d, out=tmp_path / "run", progress=False)
    trace = pd.read_parquet(tmp_path / "run" / "trace.parquet")
    # p_min ~ 11 > 8 bits of bf16: the controller moves to fp32 after the first estimate
    assert trace.pmin_smoothed[1] > 8
    assert list(trace.format) == ["bf16", "bf16", "fp32", "fp32"]
    assert list(trace.parameter_dtype) == ["bfloat16", "bfloat16", "float32", "float32"]
    assert list(trace.compute_dtype) == ["bfloat16", "bfloat16", "float32", "float32"]
    resumed = build_run(config, cohort_2d)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", resumed)
    assert state["strategy"]["format_changes"] == 1
    assert all(p.dtype == torch.float32 for p in resumed.model.parameters())
    # the sampling grid VoxelMorph caches on its first forward pass follows the change too
    live = build_run(config, cohort_2d)
    grid_dtypes = []
    for step in (1, 2):
        with live.strategy.forward_context():
            losses = live.task.losses(live.model, live.task.batch(step), live.strategy)
        live.strategy.backward_and_step(losses["total"], live.model, live.optimizer)
        live.strategy.after_step(live.model, live.optimizer)
        live.model.zero_grad(set_to_none=True)
        grids = [
            m.meshgrid
            for m in live.model.modules()
            if torch.is_tensor(getattr(m, "meshgrid", None))
        ]
        grid_dtypes.append({grid.dtype for grid in grids})
    assert grid_dtypes == [{torch.bfloat16}, {torch.float32}]
    assert live.strategy.format == "fp32"
    masters = [p for group in resumed.optimizer.param_groups for p in group["params"]]
    assert all(p.dtype == torch.float32 for p in masters)
    assert all(
        v.dtype == torch.float32
        for s in resumed.optimizer.state.values()
        for k, v in s.items()
        if k != "step"
    )


def test_dynomp_virtual_execution_rounds_to_bf16(cohort_2d: Path, tmp_path: Path) -> None:
    config = load_config(
        arm="dynomp",
        dim=2,
        steps=2,
        formats=("bf16", "fp32"),
        initial_format="bf16",
        execution="virtual",
        **TINY,
    )
    train(config, data=cohort_2d, out=tmp_path / "run", progress=False)
    trace = pd.read_parquet(tmp_path / "run" / "trace.parquet")
    assert list(trace.format) == ["bf16", "bf16"] and set(trace.parameter_dtype) == {"float32"}
    reference = load_config(arm="bf16", dim=2, steps=1, **TINY)
    train(reference, data=cohort_2d, out=tmp_path / "bf16", progress=False)
    # emulated bf16 and native bf16 give the same first loss to bf16 accuracy, unlike fp32
    native = pd.read_parquet(tmp_path / "bf16" / "trace.parquet").loss_total[0]
    assert trace.loss_total[0] == pytest.approx(native, rel=2**-7)


@pytest.mark.parametrize(("fmt", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_emulated_losses_are_reduced_as_16_bit_tensors_reduce_them(
    fmt: str, dtype: torch.dtype, cohort_2d: Path
) -> None:
    task = build_run(load_config(arm="fp32", dim=2, steps=1, **TINY), data=cohort_2d).task
    generator = torch.Generator().manual_seed(0)
    # a step's outputs, representable in the format: images of intensity 10-100, a small velocity
    values = [(torch.rand(2, 1, 32, 32, generator=generator) * 90 + 10).to(dtype),
              (torch.rand(2, 1, 32, 32, generator=generator) * 90 + 10).to(dtype),
              (torch.randn(2, 2, 32, 32, generator=generator) * 0.3).to(dtype)]

    def losses_and_gradients(tensors: list[torch.Tensor]) -> tuple[list[float], list[torch.Tensor]]:
        warped, fixed, velocity = tensors
        warped.requires_grad_(True)
        velocity.requires_grad_(True)
        losses = task.reduce(warped, fixed, velocity)
        losses["total"].backward()
        return [float(losses[key]) for key in ("total", "image", "regularisation")], [
            warped.grad.float(), velocity.grad.float()]

    native_losses, native_gradients = losses_and_gradients([value.clone() for value in values])
    with VirtualPrecision(fmt):
        emulated_losses, emulated_gradients = losses_and_gradients([value.float() for value in values])
    # float32 reductions of the same values; natively each gradient is rounded to the format
    # once, by the widening conversion's backward, and so it is under emulation: bit for bit.
    # (Rounded op by op, as before, the emulated bf16 image loss was 1312 where bf16 tensors
    # give 1315.14.)
    assert emulated_losses == native_losses
    assert all(math.isfinite(value) for value in native_losses) and native_losses[1] > 1000
    for native, emulated in zip(native_gradients, emulated_gradients, strict=True):
        assert torch.equal(native, emulated)
    assert float(native_gradients[1].abs().max()) > 0


def _train_command(data: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dynomp.cli",
        "train",
        "--arm",
        "fp32",
        "--data",
        str(data),
        "--out",
        str(out),
        "--dim",
        "2",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--quiet",
        "--threads",
        "1",
        "--config",
        str(out.parent / "tiny.yaml"),
    ]


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_weights(cohort_2d: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text("nb_features: [4, 4, 4]\ncheckpoint_every: 5\n")
    steps = 40
    subprocess.run(
        _train_command(cohort_2d, tmp_path / "straight", steps), check=True, capture_output=True
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(cohort_2d, killed, steps), stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "status.json").exists(), "the run finished before it could be killed"
    done = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < done < steps
    subprocess.run(_train_command(cohort_2d, killed, steps), check=True, capture_output=True)
    assert _status(killed)["status"] == "completed"
    trace = pd.read_parquet(killed / "trace.parquet")
    assert list(trace.step) == list(range(1, steps + 1))
    expected = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["model"]
    resumed = torch.load(killed / "model.pt", weights_only=False)["model"]
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(cohort_2d: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text("nb_features: [4, 4, 4]\ncheckpoint_every: 3\n")
    out = tmp_path / "run"
    process = subprocess.Popen(_train_command(cohort_2d, out, 5000), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 143
    status = _status(out)
    assert status["status"].startswith("interrupted at step")
    step = status["step"]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"] == step
    assert len(pd.read_parquet(out / "trace.parquet")) == step


def test_bad_input_is_one_line(cohort_2d: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["train", "--arm", "fp12", "--data", str(cohort_2d), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "unknown arm 'fp12'" in capsys.readouterr().err
    from tests.learning.conftest import write_bids_cohort

    single = write_bids_cohort(tmp_path / "single", count=1, shape=(8, 8, 8))
    assert (
        main(["train", "--arm", "fp32", "--data", str(single), "--out", str(tmp_path / "y")]) == 2
    )
    assert "found 1 subject(s)" in capsys.readouterr().err
    mixed = write_bids_cohort(
        tmp_path / "mixed", count=2, shape=(8, 8, 8), shapes={"sub-02": (8, 8, 12)}
    )
    assert (
        main(
            [
                "train",
                "--arm",
                "fp32",
                "--data",
                str(mixed),
                "--out",
                str(tmp_path / "z"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "different shapes in one batch" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 0.1\n")
    assert (
        main(
            [
                "train",
                "--arm",
                "fp32",
                "--data",
                str(cohort_2d),
                "--out",
                str(tmp_path / "w"),
                "--config",
                str(config),
            ]
        )
        == 2
    )
    assert "unknown setting(s) learning_rat" in capsys.readouterr().err
    train(
        load_config(arm="fp32", dim=2, steps=2, **TINY),
        data=cohort_2d,
        out=tmp_path / "v",
        progress=False,
    )
    other = load_config(arm="fp32", dim=2, steps=2, seed=1, **TINY)
    with pytest.raises(ValueError, match="different configuration"):
        train(other, data=cohort_2d, out=tmp_path / "v", progress=False)


@pytest.mark.parametrize("first_steps", [1, 2])
def test_dynomp_resume_restores_format_and_master_weights(
    first_steps: int, cohort_2d: Path, tmp_path: Path
) -> None:
    settings = {
        "formats": ("bf16", "fp32"),
        "native_formats": ("fp32", "bf16"),
        "initial_format": "bf16",
        **TINY,
    }
    straight = load_config(arm="dynomp", dim=2, steps=4, **settings)
    train(straight, data=cohort_2d, out=tmp_path / "straight", progress=False)
    # stopped in bf16 (after step 1) or just after the switch to fp32 (after step 2)
    train(
        load_config(arm="dynomp", dim=2, steps=first_steps, **settings),
        data=cohort_2d,
        out=tmp_path / "resumed",
        progress=False,
    )
    train(straight, data=cohort_2d, out=tmp_path / "resumed", progress=False)
    expected = pd.read_parquet(tmp_path / "straight" / "trace.parquet")
    resumed = pd.read_parquet(tmp_path / "resumed" / "trace.parquet")
    pd.testing.assert_frame_equal(
        resumed.drop(columns=["step_seconds", "peak_memory_bytes"]),
        expected.drop(columns=["step_seconds", "peak_memory_bytes"]),
    )
    final_straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["model"]
    final_resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["model"]
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_grids_not_divisible_by_the_unet_are_padded(tmp_path: Path) -> None:
    from tests.learning.conftest import write_bids_cohort

    cohort = write_bids_cohort(tmp_path / "odd", count=3, shape=(30, 27, 3))
    config = load_config(arm="fp32", dim=2, steps=1, nb_features=(4, 4, 4, 4))
    assert train(config, data=cohort, out=tmp_path / "run", progress=False).status == "completed"
