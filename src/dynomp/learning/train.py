"""The training loop shared by the learning arms: trace, checkpoints, resumption, divergence.

A run directory holds ``checkpoints/last.pt`` (every `checkpoint_every` steps, at the end, and on
SIGTERM, which Slurm sends before a time limit), ``trace.parquet`` (one row per step),
``status.json`` (completed | diverged at step k | interrupted at step k), ``metrics.json`` and, once
completed, ``model.pt``. Starting the same command again continues from the last checkpoint; on CPU
the batches depend only on (seed, step) and the checkpoint holds the RNG, optimizer, scaler and
controller state, so the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import math
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

import dynomp
from dynomp.atomic import atomic_path, write_json_atomic
from dynomp.evaluate.meters import peak_rss_bytes
from dynomp.heap import reused_heap
from dynomp.learning.config import TrainingConfig
from dynomp.learning.strategies import Strategy, make_strategy

TRACE_COLUMNS = (
    "step",
    "loss_total",
    "loss_image",
    "loss_regularisation",
    "pmin",
    "pmin_smoothed",
    "format",
    "loss_scale",
    "grad_norm",
    "parameter_dtype",
    "compute_dtype",
    "step_seconds",
    "peak_memory_bytes",
)
CHECKPOINT_NAME = "checkpoints/last.pt"
INTERRUPTED_EXIT_CODE = 128 + signal.SIGTERM


@dataclass
class TrainingRun:
    """A task with its model, optimizer and strategy, ready to train or to restore."""

    config: TrainingConfig
    task: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    strategy: Strategy


@dataclass(frozen=True)
class TrainingResult:
    """How a run ended: its status line, the exit code for the CLI and the last step done."""

    status: str
    exit_code: int
    step: int


def make_task(config: TrainingConfig, data: str | Path | None):
    """The registration or classification task of `config`."""
    if config.task == "classification":
        from dynomp.learning.classification import ClassificationTask

        return ClassificationTask(config, data)
    if data is None:
        raise ValueError("--data: a dataset directory is required for registration")
    from dynomp.learning.voxelmorph import RegistrationTask

    return RegistrationTask(config, data)


def build_run(config: TrainingConfig, data: str | Path | None) -> TrainingRun:
    """Seed, build the task's model and optimizer on the device, and let the strategy cast them."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    task = make_task(config, data)
    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    optimizer = task.build_optimizer(model)
    strategy = make_strategy(config)
    strategy.prepare(model, optimizer)
    return TrainingRun(config, task, model, optimizer, strategy)


def save_checkpoint(path: Path, run: TrainingRun, *, step: int, trace: list[dict]) -> None:
    """Everything needed to continue at `step` + 1, written atomically."""
    state = {
        "step": step,
        "config": run.config.as_dict(),
        "config_hash": run.config.config_hash(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "strategy": run.strategy.state_dict(run.optimizer),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "trace": trace,
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path, run: TrainingRun) -> dict[str, Any]:
    """Restore a checkpoint into `run`; a ValueError when it belongs to another configuration."""
    try:
        state = torch.load(path, map_location=run.config.device, weights_only=False)
    except Exception as error:
        raise ValueError(f"{path}: unreadable checkpoint ({error.__class__.__name__})") from None
    if state.get("config_hash") != run.config.config_hash():
        raise ValueError(
            f"{path}: checkpoint was written with a different configuration "
            f"(hash {state.get('config_hash')} vs {run.config.config_hash()}); use another --out"
        )
    run.strategy.load_state_dict(state["strategy"], run.model, run.optimizer)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def write_trace(path: Path, trace: list[dict]) -> None:
    """trace.parquet, atomically, with the columns in TRACE_COLUMNS order."""
    frame = pd.DataFrame(trace, columns=list(TRACE_COLUMNS))
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)


def _record(run: TrainingRun, status: str, step: int, trace: list[dict], out: Path) -> None:
    finite_steps = [row for row in trace if math.isfinite(row["loss_total"])]
    seconds = [row["step_seconds"] for row in trace]
    metrics = {
        "status": status,
        "arm": run.config.arm,
        "task": run.config.task,
        "steps_done": step,
        "final_loss_total": finite_steps[-1]["loss_total"] if finite_steps else math.nan,
        "mean_step_seconds": sum(seconds) / len(seconds) if seconds else math.nan,
        "steps_per_second": len(seconds) / sum(seconds)
        if seconds and sum(seconds) > 0
        else math.nan,
        "peak_memory_bytes": max((row["peak_memory_bytes"] for row in trace), default=0),
        "format_changes": getattr(run.strategy, "format_changes", 0),
    }
    if status == "completed" and hasattr(run.task, "final_metrics"):
        metrics.update(run.task.final_metrics(run.model, run.strategy))
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(
        out / "status.json",
        {
            "status": status,
            "step": step,
            "arm": run.config.arm,
            "task": run.config.task,
            "config": run.config.as_dict(),
            "config_hash": run.config.config_hash(),
            "versions": {
                "dynomp": dynomp.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        },
    )


def training_step(run: TrainingRun, step: int) -> tuple[dict[str, torch.Tensor], float]:
    """One step: forward, losses, and (when the loss is finite) backward, update and adaptation."""
    batch = run.task.batch(step)
    run.model.zero_grad(set_to_none=True)
    run.optimizer.zero_grad(set_to_none=True)
    with run.strategy.forward_context():
        losses = run.task.losses(run.model, batch, run.strategy)
    if not math.isfinite(float(losses["total"].detach())):
        return losses, math.nan
    grad_norm = run.strategy.backward_and_step(losses["total"], run.model, run.optimizer)
    run.strategy.after_step(run.model, run.optimizer)
    return losses, grad_norm


def train(
    config: TrainingConfig, *, data: str | Path | None, out: str | Path, progress: bool = True
) -> TrainingResult:
    """Train one arm into `out`, continuing from its last checkpoint when there is one.

    The steps run with freed memory kept for the next step (`dynomp.heap.reused_heap`), as a
    registration does: no page faults for their temporaries."""
    with reused_heap():
        return _train(config, data=data, out=out, progress=progress)


def _train(
    config: TrainingConfig, *, data: str | Path | None, out: str | Path, progress: bool
) -> TrainingResult:
    out = Path(out)
    run = build_run(config, data)
    checkpoint_path = out / CHECKPOINT_NAME
    device = torch.device(config.device)
    start, trace = 0, []
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, run)
        start, trace = int(state["step"]), list(state["trace"])
        if start > config.steps:
            raise ValueError(
                f"--steps: {config.steps} is fewer than the {start} steps already done in {out}"
            )
    out.mkdir(parents=True, exist_ok=True)
    # status.json marks a finished run: a run in progress (or killed) must not look finished
    (out / "status.json").unlink(missing_ok=True)

    compute_dtypes: list[torch.dtype] = []
    hook = run.task.output_layer(run.model).register_forward_hook(
        lambda module, inputs, output: compute_dtypes.append(output.dtype)
    )
    terminated = []
    previous_handler = None
    try:
        previous_handler = signal.signal(
            signal.SIGTERM, lambda signum, frame: terminated.append(signum)
        )
    except ValueError:
        pass  # not the main thread: no SIGTERM checkpointing, the rest is unchanged
    status = "completed"
    step = start
    try:
        bar = tqdm(
            range(start + 1, config.steps + 1),
            initial=start,
            total=config.steps,
            desc=f"{config.task} {config.arm}",
            disable=not progress,
        )
        for step in bar:
            started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # the format and dtype this step runs in (after_step may pick another for the next one)
            step_format = run.strategy.format
            parameter_dtype = str(next(run.model.parameters()).dtype).removeprefix("torch.")
            losses, grad_norm = training_step(run, step)
            total = float(losses["total"].detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = int(torch.cuda.max_memory_allocated(device))
            else:
                peak = peak_rss_bytes()
            row = {
                "step": step,
                "loss_total": total,
                "loss_image": float(losses["image"].detach()),
                "loss_regularisation": float(losses["regularisation"].detach()),
                **run.strategy.record(),
                "format": step_format,
                "grad_norm": grad_norm,
                "parameter_dtype": parameter_dtype,
                "compute_dtype": str(compute_dtypes[-1]).removeprefix("torch."),
                "step_seconds": time.perf_counter() - started,
                "peak_memory_bytes": peak,
            }
            trace.append(row)
            bar.set_postfix(loss=f"{total:.4g}", format=row["format"])
            if not math.isfinite(total):
                status = f"diverged at step {step}"
                break
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(checkpoint_path, run, step=step, trace=trace)
                write_trace(out / "trace.parquet", trace)
            if terminated:
                save_checkpoint(checkpoint_path, run, step=step, trace=trace)
                status = f"interrupted at step {step}"
                break
    finally:
        hook.remove()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    write_trace(out / "trace.parquet", trace)
    if status == "completed":
        with atomic_path(out / "model.pt") as temporary:
            torch.save({"config": config.as_dict(), "model": run.model.state_dict()}, temporary)
    _record(run, status, step, trace, out)
    exit_code = INTERRUPTED_EXIT_CODE if status.startswith("interrupted") else 0
    return TrainingResult(status, exit_code, step)
