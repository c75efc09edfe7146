"""`dynomp register`: register one pair with one arm and write images, warps, trace and metrics."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from dynomp import __version__
from dynomp.atomic import atomic_path, write_json_atomic
from dynomp.data.nifti import check_same_grid, read_volume
from dynomp.evaluate.jacobian import folding_percent, jacobian_determinant, sd_log_jacobian
from dynomp.evaluate.meters import ResourceMeter
from dynomp.evaluate.overlap import dice, jaccard, mean_over_labels
from dynomp.evaluate.similarity import normalized_cross_correlation, normalized_mutual_information
from dynomp.registration.config import load_config
from dynomp.registration.precision import ANTS_ARMS, ARMS, check_arm
from dynomp.registration.transforms import sample, to_voxels

TRACE_COLUMNS = ("stage", "level", "iteration", "loss", "pmin", "pmin_smoothed", "format", "seconds")
SINGLE_PRECISION_ARMS = ("fp32", "bf16", "fp16", "ants-fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `register` subcommand."""
    parser = subparsers.add_parser("register", help="register a moving image to a fixed image")
    parser.add_argument("--fixed", required=True, type=Path, help="fixed image (NIfTI)")
    parser.add_argument("--moving", required=True, type=Path, help="moving image (NIfTI)")
    parser.add_argument("--arm", required=True, help=f"one of: {', '.join(ARMS)}")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--fixed-labels", type=Path, help="label map on the fixed image's grid")
    parser.add_argument("--moving-labels", type=Path, help="label map on the moving image's grid")
    parser.add_argument("--config", type=Path, help="YAML config (default: the paper's parameters)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.set_defaults(handler=run_register)


def _read_labels(path: Path, image: Any, image_name: str, label_name: str) -> Any:
    labels = read_volume(path, labels=True)
    check_same_grid(image, labels, first_name=image_name, second_name=label_name)
    if not np.any(labels.data != 0):
        raise ValueError(f"{path}: the label map is empty (no non-zero label)")
    return labels


def write_displacement(path: Path, displacement_ras: np.ndarray, affine: np.ndarray, dtype: str) -> Path:
    """A displacement field as ANTs/ITK read it: (x, y, z, 1, 3), vector intent, LPS millimetres."""
    lps = displacement_ras * np.array([-1.0, -1.0, 1.0])
    data = lps.reshape(*lps.shape[:3], 1, 3).astype(dtype)
    image = nib.Nifti1Image(data, affine)
    image.header.set_intent("vector", (), "")
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path


def _write_image(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    with atomic_path(path) as temporary:
        nib.save(nib.Nifti1Image(data, affine), str(temporary))
    return path


def _moving_coordinates(forward_ras: np.ndarray, fixed_affine: np.ndarray,
                        moving_affine: np.ndarray) -> torch.Tensor:
    """Moving-grid voxel coordinates of every fixed voxel, from the forward displacement."""
    shape = forward_ras.shape[:3]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    points = np.einsum("ij,j...->i...", fixed_affine[:3, :3], grid) + fixed_affine[:3, 3, None, None, None]
    points = points + np.moveaxis(forward_ras, -1, 0)
    return to_voxels(torch.as_tensor(points), torch.as_tensor(moving_affine))


def run_register(args: argparse.Namespace) -> int:
    """Register, then write warped image and labels, both warps, trace.parquet and metrics.json."""
    arm = check_arm(args.arm)
    config = load_config(args.config)
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    if fixed.data.ndim != moving.data.ndim:
        raise ValueError(
            f"{args.moving}: {moving.data.ndim}-D image where the fixed image {args.fixed} is "
            f"{fixed.data.ndim}-D"
        )
    if fixed.data.ndim != 3:
        raise ValueError(f"{args.fixed}: dynomp register needs 3-D images, got {fixed.data.ndim}-D")
    fixed_labels = moving_labels = None
    if args.fixed_labels is not None:
        fixed_labels = _read_labels(args.fixed_labels, fixed, str(args.fixed), str(args.fixed_labels))
    if args.moving_labels is not None:
        moving_labels = _read_labels(args.moving_labels, moving, str(args.moving), str(args.moving_labels))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but no CUDA device is available")
    torch.set_num_threads(max(1, args.threads))

    with ResourceMeter(device=args.device) as meter:
        if arm in ANTS_ARMS:
            from dynomp.registration.ants_arm import run_ants

            outcome = run_ants(fixed=args.fixed, moving=args.moving, config=config, arm=arm,
                               threads=args.threads)
            seconds_by_format: dict[str, float] = {}
            for row in outcome.trace:
                seconds_by_format[row["format"]] = seconds_by_format.get(row["format"], 0.0) + row["seconds"]
        else:
            from dynomp.registration.pipeline import register_pair

            outcome = register_pair(fixed=fixed, moving=moving, config=config, precision=arm,
                                    device=args.device)
            seconds_by_format = outcome.seconds_by_format

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixed_affine = np.asarray(fixed.affine, dtype=np.float64)
    moving_affine = np.asarray(moving.affine, dtype=np.float64)
    warp_dtype = "float32" if arm in SINGLE_PRECISION_ARMS else "float64"
    coordinates = _moving_coordinates(outcome.forward_displacement, fixed_affine, moving_affine)
    warped = sample(torch.as_tensor(np.asarray(moving.data, dtype=np.float64)), coordinates,
                    padding="zeros").numpy()
    _write_image(out / "warped.nii.gz", warped.astype(warp_dtype), fixed_affine)
    write_displacement(out / "forward_warp.nii.gz", outcome.forward_displacement, fixed_affine, warp_dtype)
    write_displacement(out / "inverse_warp.nii.gz", outcome.inverse_displacement, moving_affine, warp_dtype)

    overlap: dict[str, Any] = {}
    if moving_labels is not None:
        warped_labels = sample(torch.as_tensor(np.asarray(moving_labels.data, dtype=np.float64)),
                               coordinates, mode="nearest", padding="zeros").numpy()
        warped_labels = np.rint(warped_labels).astype(np.int32)
        _write_image(out / "warped_labels.nii.gz", warped_labels, fixed_affine)
        if fixed_labels is not None:
            dice_scores = dice(np.asarray(fixed_labels.data), warped_labels)
            jaccard_scores = jaccard(np.asarray(fixed_labels.data), warped_labels)
            overlap = {
                "dice": {str(k): v for k, v in dice_scores.items()},
                "dice_mean": mean_over_labels(dice_scores),
                "jaccard": {str(k): v for k, v in jaccard_scores.items()},
                "jaccard_mean": mean_over_labels(jaccard_scores),
            }

    trace = pd.DataFrame(outcome.trace, columns=list(TRACE_COLUMNS))
    with atomic_path(out / "trace.parquet") as temporary:
        trace.to_parquet(temporary, index=False)

    determinant = jacobian_determinant(outcome.forward_displacement, spacing=fixed.spacing[:3])
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
        "device": args.device,
        "threads": args.threads,
        **overlap,
        "ncc": normalized_cross_correlation(np.asarray(fixed.data), warped),
        "nmi": normalized_mutual_information(np.asarray(fixed.data), warped),
        "jacobian_nonpositive_percent": folding_percent(determinant),
        "sd_log_jacobian": sd_log_jacobian(determinant),
        "final_losses": outcome.final_losses,
        **meter.as_dict(),
        "seconds_by_format": seconds_by_format,
        "warp_dtype": warp_dtype,
    }
    write_json_atomic(out / "metrics.json", metrics)
    return 0
