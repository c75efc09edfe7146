"""Register one pair of NIfTI files with one arm and write everything a study reads.

`register_files` is what `dynomp register`, `make demo` and the workflow call: it reads and
validates the inputs, runs the engine or antsRegistration, and writes, atomically, in `out`:
`warped.nii.gz`, `warped_labels.nii.gz`, `forward_warp.nii.gz` and `inverse_warp.nii.gz` (ITK
displacement fields), `trace.parquet` and `metrics.json`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dynomp import __version__
from dynomp.atomic import atomic_path, write_json_atomic
from dynomp.data.nifti import check_same_grid, read_volume, write_itk_displacement, write_volume
from dynomp.evaluate.jacobian import folding_percent, jacobian_determinant, sd_log_jacobian
from dynomp.evaluate.meters import ResourceMeter
from dynomp.evaluate.overlap import dice, jaccard, mean_over_labels
from dynomp.evaluate.similarity import normalized_cross_correlation, normalized_mutual_information
from dynomp.registration.config import RegistrationConfig, load_config
from dynomp.registration.precision import ANTS_ARMS, check_arm
from dynomp.registration.transforms import sample, to_voxels

TRACE_COLUMNS = ("stage", "level", "iteration", "loss", "pmin", "pmin_smoothed", "format", "seconds")
SINGLE_PRECISION_ARMS = ("fp32", "bf16", "fp16", "ants-fp32")


def _read_labels(path: Path, image: Any, image_name: str, label_name: str) -> Any:
    labels = read_volume(path, labels=True)
    check_same_grid(image, labels, first_name=image_name, second_name=label_name)
    if not np.any(labels.data != 0):
        raise ValueError(f"{path}: the label map is empty (no non-zero label)")
    return labels


def write_displacement(path: Path, displacement_ras: np.ndarray, affine: np.ndarray, dtype: str) -> Path:
    """A displacement field as ANTs/ITK read it: (x, y, z, 1, 3), vector intent, LPS millimetres."""
    return write_itk_displacement(path, displacement_ras, affine, dtype=dtype)


def _write_image(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    return write_volume(path, data, affine)


def _moving_coordinates(forward_ras: np.ndarray, fixed_affine: np.ndarray,
                        moving_affine: np.ndarray) -> torch.Tensor:
    """Moving-grid voxel coordinates of every fixed voxel, from the forward displacement."""
    shape = forward_ras.shape[:3]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    points = np.einsum("ij,j...->i...", fixed_affine[:3, :3], grid) + fixed_affine[:3, 3, None, None, None]
    points = points + np.moveaxis(forward_ras, -1, 0)
    return to_voxels(torch.as_tensor(points), torch.as_tensor(moving_affine))


def register_files(
    *,
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    arm: str,
    out: str | os.PathLike,
    fixed_labels: str | os.PathLike | None = None,
    moving_labels: str | os.PathLike | None = None,
    config: str | os.PathLike | RegistrationConfig | None = None,
    device: str = "cpu",
    threads: int = 2,
) -> dict[str, Any]:
    """Register `moving` to `fixed` with `arm`; write the outputs in `out`; return the metrics."""
    arm = check_arm(arm)
    fixed_path, moving_path = Path(fixed), Path(moving)
    config = config if isinstance(config, RegistrationConfig) else load_config(config)
    fixed_volume = read_volume(fixed_path)
    moving_volume = read_volume(moving_path)
    if fixed_volume.data.ndim != moving_volume.data.ndim:
        raise ValueError(
            f"{moving_path}: {moving_volume.data.ndim}-D image where the fixed image {fixed_path} "
            f"is {fixed_volume.data.ndim}-D"
        )
    if fixed_volume.data.ndim != 3:
        raise ValueError(
            f"{fixed_path}: registration needs 3-D images, got {fixed_volume.data.ndim}-D"
        )
    fixed_label_volume = moving_label_volume = None
    if fixed_labels is not None:
        fixed_label_volume = _read_labels(Path(fixed_labels), fixed_volume, str(fixed_path),
                                          str(fixed_labels))
    if moving_labels is not None:
        moving_label_volume = _read_labels(Path(moving_labels), moving_volume, str(moving_path),
                                           str(moving_labels))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is available")
    torch.set_num_threads(max(1, threads))

    with ResourceMeter(device=device) as meter:
        if arm in ANTS_ARMS:
            from dynomp.registration.ants_arm import run_ants

            outcome = run_ants(fixed=fixed_path, moving=moving_path, config=config, arm=arm,
                               threads=threads)
            seconds_by_format: dict[str, float] = {}
            for row in outcome.trace:
                seconds_by_format[row["format"]] = seconds_by_format.get(row["format"], 0.0) + row["seconds"]
        else:
            from dynomp.registration.pipeline import register_pair

            outcome = register_pair(fixed=fixed_volume, moving=moving_volume, config=config, precision=arm,
                                    device=device)
            seconds_by_format = outcome.seconds_by_format

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fixed_affine = np.asarray(fixed_volume.affine, dtype=np.float64)
    moving_affine = np.asarray(moving_volume.affine, dtype=np.float64)
    warp_dtype = "float32" if arm in SINGLE_PRECISION_ARMS else "float64"
    coordinates = _moving_coordinates(outcome.forward_displacement, fixed_affine, moving_affine)
    warped = sample(torch.as_tensor(np.asarray(moving_volume.data, dtype=np.float64)), coordinates,
                    padding="zeros").numpy()
    _write_image(out / "warped.nii.gz", warped.astype(warp_dtype), fixed_affine)
    write_displacement(out / "forward_warp.nii.gz", outcome.forward_displacement, fixed_affine, warp_dtype)
    write_displacement(out / "inverse_warp.nii.gz", outcome.inverse_displacement, moving_affine, warp_dtype)

    overlap: dict[str, Any] = {}
    if moving_label_volume is not None:
        warped_labels = sample(torch.as_tensor(np.asarray(moving_label_volume.data, dtype=np.float64)),
                               coordinates, mode="nearest", padding="zeros").numpy()
        warped_labels = np.rint(warped_labels).astype(np.int32)
        _write_image(out / "warped_labels.nii.gz", warped_labels, fixed_affine)
        if fixed_label_volume is not None:
            dice_scores = dice(np.asarray(fixed_label_volume.data), warped_labels)
            jaccard_scores = jaccard(np.asarray(fixed_label_volume.data), warped_labels)
            overlap = {
                "dice": {str(k): v for k, v in dice_scores.items()},
                "dice_mean": mean_over_labels(dice_scores),
                "jaccard": {str(k): v for k, v in jaccard_scores.items()},
                "jaccard_mean": mean_over_labels(jaccard_scores),
            }

    trace = pd.DataFrame(outcome.trace, columns=list(TRACE_COLUMNS))
    with atomic_path(out / "trace.parquet") as temporary:
        trace.to_parquet(temporary, index=False)

    determinant = jacobian_determinant(outcome.forward_displacement, spacing=fixed_volume.spacing[:3])
    import ants

    metrics = {
        "arm": arm,
        "status": outcome.status,
        "diverged_at": outcome.diverged_at,
        "versions": {
            "dynomp": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "antspyx": getattr(ants, "__version__", None), "python": platform.python_version(),
        },
        "config": config.to_dict(),
        "device": device,
        "threads": threads,
        **overlap,
        "ncc": normalized_cross_correlation(np.asarray(fixed_volume.data), warped),
        "nmi": normalized_mutual_information(np.asarray(fixed_volume.data), warped),
        "jacobian_nonpositive_percent": folding_percent(determinant),
        "sd_log_jacobian": sd_log_jacobian(determinant),
        "final_losses": outcome.final_losses,
        # the engine's, with reference_losses: true in the config (empty otherwise, and for ANTs)
        "reference_losses": getattr(outcome, "reference_losses", {}),
        **meter.as_dict(),
        "seconds_by_format": seconds_by_format,
        "warp_dtype": warp_dtype,
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
