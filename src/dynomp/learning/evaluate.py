"""`dynomp evaluate-model`: a trained VoxelMorph arm on its held-out pairs, as a tidy table.

Inference runs in the arm's own precision (autocast for the amp arms, the cast dtype for bf16/fp16,
the last chosen format for dynomp). Label maps are warped with nearest-neighbour sampling of the
predicted displacement; the Jacobian is taken of the displacement in voxel units.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import voxelmorph as vxm

from dynomp.atomic import atomic_path
from dynomp.evaluate.jacobian import folding_percent, jacobian_determinant, sd_log_jacobian
from dynomp.evaluate.meters import ResourceMeter
from dynomp.evaluate.overlap import dice
from dynomp.learning.config import load_config
from dynomp.learning.data import evaluation_pairs, stack_images
from dynomp.learning.train import CHECKPOINT_NAME, build_run, load_checkpoint

TABLE_COLUMNS = ("arm", "moving", "fixed", "metric", "label", "value")
TABLE_SUFFIXES = (".parquet", ".tsv")


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a table atomically as Parquet or TSV, chosen by the file's suffix."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unknown table format (use {' or '.join(TABLE_SUFFIXES)})")
    with atomic_path(path) as temporary:
        if path.suffix == ".parquet":
            table.to_parquet(temporary, index=False)
        else:
            table.to_csv(temporary, sep="\t", index=False, na_rep="n/a")
    return path


def evaluate_model(*, run: str | Path, data: str | Path, out: str | Path) -> pd.DataFrame:
    """Dice per label, % det J <= 0, SDlogJ, inference seconds and peak memory per held-out pair.

    A run that did not complete (diverged, interrupted) gets an empty table with the same columns.
    """
    run, out = Path(run), Path(out)
    if out.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{out}: unknown table format (use {' or '.join(TABLE_SUFFIXES)})")
    status_path = run / "status.json"
    if not status_path.is_file():
        raise FileNotFoundError(f"{status_path}: not found (is {run} a `dynomp train` run?)")
    status = json.loads(status_path.read_text())
    if status["status"] != "completed":
        # a diverged arm is a result: an empty table lets the study go on and report the status
        table = pd.DataFrame(columns=list(TABLE_COLUMNS)).astype({"label": "Int64"})
        write_table(table, out)
        return table
    config = load_config(None, **status["config"])
    if config.task != "registration":
        raise ValueError(
            f"{run}: evaluate-model needs a registration run, got task {config.task!r}"
        )
    training = build_run(config, data)
    load_checkpoint(run / CHECKPOINT_NAME, training)
    model, strategy, device = training.model, training.strategy, torch.device(config.device)
    model.eval()
    nearest = vxm.nn.modules.SpatialTransformer(interpolation_mode="nearest")
    pairs = evaluation_pairs(training.task.train_subjects, training.task.held_out_subjects)

    def predict(moving_image: np.ndarray, fixed_image: np.ndarray) -> torch.Tensor:
        stacked = torch.from_numpy(stack_images([moving_image, fixed_image], ["moving", "fixed"]))
        moving, fixed = (strategy.cast_input(image[None]) for image in stacked)
        with torch.no_grad(), strategy.forward_context():
            return model(moving, fixed)

    predict(pairs[0][0].image, pairs[0][1].image)  # warm-up: allocations and the cached grid
    rows = []
    for moving, fixed in pairs:
        with ResourceMeter(device=str(device)) as meter:
            displacement = predict(moving.image, fixed.image)
        displacement = displacement.float()
        with torch.no_grad():
            labels = torch.from_numpy(moving.labels.astype(np.float32))[None, None].to(device)
            warped_labels = (
                nearest(labels, displacement)[0, 0].round().cpu().numpy().astype(np.int32)
            )
        field = np.moveaxis(displacement[0].cpu().numpy(), 0, -1)
        determinant = jacobian_determinant(field, spacing=(1.0,) * config.dim)
        peak = meter.peak_gpu_bytes if meter.peak_gpu_bytes is not None else meter.peak_rss_bytes
        base = {"arm": config.arm, "moving": moving.name, "fixed": fixed.name}
        labels_present = sorted(
            (set(np.unique(fixed.labels)) | set(np.unique(moving.labels))) - {0}
        )
        for label, score in dice(fixed.labels, warped_labels, labels_present).items():
            rows.append({**base, "metric": "dice", "label": label, "value": score})
        for metric, value in (
            ("jacobian_nonpositive_percent", folding_percent(determinant)),
            ("sd_log_jacobian", sd_log_jacobian(determinant)),
            ("inference_seconds", meter.wall_seconds),
            ("peak_memory_bytes", float(peak)),
        ):
            rows.append({**base, "metric": metric, "label": None, "value": value})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).astype({"label": "Int64"})
    write_table(table, out)
    return table
