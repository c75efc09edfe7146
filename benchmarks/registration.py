"""Benchmark of the registration engine against ANTs and DIPY on one realistic 3 mm brain pair.

    .venv/bin/python benchmarks/registration.py [--threads 2] [--preset paper] [--seed 0] [--repeats 1]
        [--device cpu|cuda] [--arms ants-fp64 ants-fp32 dipy fp64 fp32 dynomp] [--out results/benchmarks/registration.json]
        [--execution native|virtual] [--native-formats fp64 fp32 bf16 fp16] [--reference-losses] [--against REV]
        [--one-process]

The pair is built from the MNI152 2009a template that nilearn ships (T1, GM and WM maps at 1 mm):
resampled to 3 mm, labelled CSF/GM/WM x left/right (six labels, split at the midline x = 0), and
deformed twice by random smooth diffeomorphisms (scaling and squaring of a smoothed random
velocity field). The fixed image is one deformed copy; the moving image is another, with a small
rigid misalignment on top; both get Gaussian noise.

Every arm runs on that pair, with the same thread count, in a fresh child process of its own
(`--run-arm`), so that peak memories do not mix. ANTs and DIPY run once; the engine arms run
`--repeats` times, interleaved (fp64, fp32, dynomp, fp64, ...), and report the median time and the
median peak, because a shared machine's speed drifts by 10-30 % over minutes. Each child imports what the arm needs, loads
the pair, records its resident memory, resets the kernel's peak counter (/proc/self/clear_refs),
registers, and reports the peak (VmHWM) minus that baseline. Wall time covers the registration
only (not loading, not warping the labels afterwards). Dice is the mean over the six labels of the
moving labels warped onto the fixed grid (nearest neighbour) against the fixed labels.

Arms: antsRegistration (antspyx) with `--float 0` and `--float 1`, DIPY (MI affine, then
SymmetricDiffeomorphicRegistration with CCMetric radius 4) and the engine's fp64, fp32 and dynomp
arms. ANTs and the engine run the same `RegistrationConfig` (the paper's command by default);
DIPY runs the same pyramid and iteration limits in its own optimisers.

`--one-process` runs the engine arms' rounds in one child process instead, the arms in turn (each
registration still measured alone: baseline, peak reset, peak): on a shared host one process can
run 20-40 % faster or slower than the next for its whole life, and in one process every round's
arms share that speed. It measures time only: a later registration reuses the heap an earlier one
grew, so its peak memory is not the arm's (reported as NaN; the default mode measures memory).

`--against REV` measures a change: the engine arms also run from the commit REV (checked out in a
temporary git worktree, its own code and its own copy of this script), each round running both
versions of an arm back to back in alternating order, and a second table gives this tree's time,
peak memory and final losses against REV's, arm by arm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

ENGINE_ARMS = ("fp64", "fp32", "dynomp", "bf16")
PEER_ARMS = ("ants-fp64", "ants-fp32", "dipy")
DEFAULT_ARMS = ("ants-fp64", "ants-fp32", "dipy", "fp64", "fp32", "dynomp")
VOXEL_MM = 3.0
LABEL_NAMES = {1: "CSF-L", 2: "CSF-R", 3: "GM-L", 4: "GM-R", 5: "WM-L", 6: "WM-R"}
PAIR_FILES = ("fixed", "moving", "fixed_labels", "moving_labels")


# ---------------------------------------------------------------------------------------------
# the pair


def template_files() -> dict[str, Path]:
    """The MNI152 2009a T1, GM and WM files that nilearn ships."""
    import nilearn.datasets

    folder = Path(nilearn.datasets.__file__).parent / "data"
    files = {kind: folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
             for kind in ("t1", "gm", "wm")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nilearn's bundled MNI152 2009a file is missing")
    return files


def template_at_3mm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 in [0, 1], six-label map, affine) of the template on a 3 mm grid."""
    from nilearn.image import resample_img, smooth_img

    files = template_files()
    target = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    source = nib.load(str(files["t1"]))
    # the 3 mm grid covers the template's field of view, starting at its first voxel centre
    target[:3, 3] = source.affine[:3, 3]
    shape = tuple(int(n) // int(VOXEL_MM) for n in source.shape)
    resampled = {}
    for kind, path in files.items():
        # smoothing first (FWHM = the new voxel size) so that the resampling does not alias
        image = smooth_img(str(path), fwhm=VOXEL_MM)
        resampled[kind] = resample_img(
            image, target_affine=target, target_shape=shape, interpolation="continuous",
            force_resample=True, copy_header=True,
        ).get_fdata().clip(min=0)
    t1 = resampled["t1"] / resampled["t1"].max()
    gm, wm = resampled["gm"] / 255.0, resampled["wm"] / 255.0
    brain = t1 > 0.05
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0)  # 0 CSF, 1 GM, 2 WM
    x_world = (target[0, 0] * np.arange(shape[0]) + target[0, 3])[:, None, None]
    right = np.broadcast_to(x_world > 0, shape)
    labels = np.where(brain, 1 + 2 * tissue + right, 0).astype(np.int16)
    return t1 * brain, labels, target


def random_diffeomorphism(shape: tuple[int, ...], *, rng: np.random.Generator,
                          largest_mm: float) -> np.ndarray:
    """A smooth invertible displacement (3, *shape) in voxels: exp of a smoothed random velocity."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    velocity = np.stack([gaussian_filter(rng.normal(size=shape), 4.0) for _ in range(3)])
    velocity *= (largest_mm / VOXEL_MM) / np.abs(velocity).max()
    squarings = 6
    displacement = velocity / 2**squarings
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    for _ in range(squarings):
        displacement = displacement + np.stack([
            map_coordinates(component, grid + displacement, order=1, mode="nearest")
            for component in displacement
        ])
    return displacement


def rigid_voxel_map(shape: tuple[int, ...], *, degrees: tuple[float, float, float],
                    shift_mm: tuple[float, float, float]) -> np.ndarray:
    """Voxel coordinates (3, *shape) of a rotation about the grid centre plus a shift."""
    from scipy.spatial.transform import Rotation

    matrix = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    center = (np.array(shape, dtype=float) - 1) / 2
    offset = grid.reshape(3, -1) - center[:, None]
    mapped = matrix @ offset + center[:, None] + np.array(shift_mm)[:, None] / VOXEL_MM
    return mapped.reshape(3, *shape)


def build_pair(*, seed: int) -> dict[str, np.ndarray]:
    """Fixed and moving images and label maps (and the affine) from the template, seeded."""
    from scipy.ndimage import map_coordinates

    t1, labels, affine = template_at_3mm()
    shape = t1.shape
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    pair: dict[str, np.ndarray] = {"affine": affine}
    for name, rigid in (("fixed", None), ("moving", ((4.0, -3.0, 5.0), (4.0, -5.0, 3.0)))):
        displacement = random_diffeomorphism(shape, rng=rng, largest_mm=7.0)
        if rigid is None:
            coordinates = grid + displacement
        else:
            # the template sampled at rigid(x) + deformation(rigid(x)): a warped, misaligned copy
            rigid_coordinates = rigid_voxel_map(shape, degrees=rigid[0], shift_mm=rigid[1])
            warp_at_rigid = np.stack([map_coordinates(component, rigid_coordinates, order=1, mode="nearest")
                                      for component in displacement])
            coordinates = rigid_coordinates + warp_at_rigid
        image = map_coordinates(t1, coordinates, order=3, mode="constant", cval=0.0).clip(min=0)
        image += rng.normal(scale=0.02, size=shape)
        pair[name] = image.astype(np.float32)
        pair[f"{name}_labels"] = map_coordinates(labels, coordinates, order=0, mode="constant",
                                                 cval=0).astype(np.int16)
    return pair


def write_pair(pair: dict[str, np.ndarray], folder: Path) -> None:
    """The pair as NIfTI files (what ANTs reads) in `folder`."""
    from dynomp.atomic import atomic_path

    for name in PAIR_FILES:
        with atomic_path(folder / f"{name}.nii.gz") as temporary:
            nib.save(nib.Nifti1Image(pair[name], pair["affine"]), str(temporary))


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> tuple[float, dict[str, float]]:
    """Mean Dice over the six labels, and each label's Dice."""
    from dynomp.evaluate.overlap import dice, mean_over_labels

    scores = dice(np.asarray(fixed_labels), np.asarray(warped_labels), labels=list(LABEL_NAMES))
    return mean_over_labels(scores), {LABEL_NAMES[k]: v for k, v in scores.items()}


# ---------------------------------------------------------------------------------------------
# one arm, in its own process


def resident_bytes() -> int:
    """Resident memory of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_resident_bytes() -> int:
    """The kernel's peak resident memory of this process (VmHWM) since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_resident() -> None:
    """Reset VmHWM to the current resident size (Linux >= 4.0), so the peak measured is the arm's."""
    Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def captured_stdout(path: Path):
    """Send file descriptor 1 (where ANTs' C++ code prints) to `path` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as target:
        os.dup2(target.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def load_volume(folder: Path, name: str) -> Any:
    """A pair file as an object with .data (float64 or int) and .affine."""
    from types import SimpleNamespace

    image = nib.load(str(folder / f"{name}.nii.gz"))
    return SimpleNamespace(data=np.asarray(image.dataobj), affine=image.affine)


def run_engine_arm(arm: str, *, folder: Path, config: Any, device: str = "cpu") -> dict[str, Any]:
    """One engine arm: register_pair on the pair; time, memory, Dice, final losses, formats.

    On `cuda` the peak GPU memory (allocated by torch, above what the loaded pair holds) is measured
    too; the wall time then includes the copies back to the host that register_pair's outputs need.
    """
    import torch

    from dynomp.registration.interpolation import load_kernels
    from dynomp.registration.pipeline import register_pair

    fixed, moving = load_volume(folder, "fixed"), load_volume(folder, "moving")
    fixed_labels, moving_labels = load_volume(folder, "fixed_labels"), load_volume(folder, "moving_labels")
    torch.set_num_threads(config.threads)
    # the compiled sampler is part of the code the arm imports: load it before the baseline
    load_kernels()
    gpu = device == "cuda"
    if gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device (a CPU wheel, or no GPU)")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated()
    baseline = resident_bytes()
    reset_peak_resident()
    started = time.perf_counter()
    result = register_pair(fixed=fixed, moving=moving, config=config, precision=arm, device=device)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = peak_resident_bytes()
    peak_gpu = torch.cuda.max_memory_allocated() - gpu_baseline if gpu else None
    warped = result.warp_moving(moving_labels.data, labels=True)
    dice_mean, dice_by_label = mean_dice(fixed_labels.data, warped)
    iterations: dict[str, int] = {}
    seconds_by_level: dict[str, float] = {}
    for row in result.trace:
        key = f"{row['stage']}/{row['level']}"
        iterations[key] = iterations.get(key, 0) + 1
        seconds_by_level[key] = seconds_by_level.get(key, 0.0) + row["seconds"]
    return {
        "arm": arm, "status": result.status, "seconds": seconds,
        "peak_bytes_above_baseline": peak - baseline, "baseline_bytes": baseline,
        "device": device, "peak_gpu_bytes": peak_gpu,
        "dice": dice_mean, "dice_by_label": dice_by_label, "final_losses": result.final_losses,
        "reference_losses": result.reference_losses,
        "iterations": iterations, "seconds_by_format": result.seconds_by_format,
        "seconds_by_level": seconds_by_level,
    }


def run_ants_arm(arm: str, *, folder: Path, config: Any) -> dict[str, Any]:
    """antsRegistration in this process (the same compiled code `dynomp register` runs)."""
    import ants

    from dynomp.registration.ants_arm import ants_arguments, parse_trace

    with tempfile.TemporaryDirectory(prefix="dynomp-bench-ants-") as work:
        prefix = str(Path(work) / "out_")
        arguments = ants_arguments(
            fixed=str(folder / "fixed.nii.gz"), moving=str(folder / "moving.nii.gz"), prefix=prefix,
            config=config, single_precision=arm == "ants-fp32",
        )
        fixed_labels = ants.image_read(str(folder / "fixed_labels.nii.gz"))
        moving_labels = ants.image_read(str(folder / "moving_labels.nii.gz"))
        log_path = Path(work) / "log.txt"
        baseline = resident_bytes()
        reset_peak_resident()
        with captured_stdout(log_path):
            started = time.perf_counter()
            ants.registration(arguments, None)
            seconds = time.perf_counter() - started
        peak = peak_resident_bytes()
        transforms = [f"{prefix}0GenericAffine.mat"]
        if any(stage.name == "syn" for stage in config.stages):
            transforms.insert(0, f"{prefix}1Warp.nii.gz")
        warped = ants.apply_transforms(fixed=fixed_labels, moving=moving_labels, transformlist=transforms,
                                       interpolator="nearestNeighbor")
        trace = parse_trace(log_path.read_text(), config, fmt="fp32" if arm == "ants-fp32" else "fp64")
    dice_mean, dice_by_label = mean_dice(fixed_labels.numpy(), np.rint(warped.numpy()).astype(np.int16))
    final_losses: dict[str, float] = {}
    iterations: dict[str, int] = {}
    for row in trace:
        key = f"{row['stage']}/{row['level']}"
        final_losses[key] = row["loss"]
        iterations[key] = iterations.get(key, 0) + 1
    return {
        "arm": arm, "status": "completed", "seconds": seconds,
        "peak_bytes_above_baseline": peak - baseline, "baseline_bytes": baseline,
        "dice": dice_mean, "dice_by_label": dice_by_label, "final_losses": final_losses,
        "iterations": iterations,
    }


def run_dipy_arm(*, folder: Path, config: Any) -> dict[str, Any]:
    """DIPY: centres of mass, rigid and affine with Mattes MI, then SyN with CC radius 4."""
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D

    fixed, moving = load_volume(folder, "fixed"), load_volume(folder, "moving")
    fixed_labels, moving_labels = load_volume(folder, "fixed_labels"), load_volume(folder, "moving_labels")
    fixed_data = np.asarray(fixed.data, dtype=np.float64)
    moving_data = np.asarray(moving.data, dtype=np.float64)
    stages = {stage.name: stage for stage in config.stages}
    syn = stages.get("syn")
    baseline = resident_bytes()
    reset_peak_resident()
    started = time.perf_counter()
    start = transform_centers_of_mass(fixed_data, fixed.affine, moving_data, moving.affine)
    affine = start.affine
    for kind, transform in (("rigid", RigidTransform3D()), ("affine", AffineTransform3D())):
        if kind not in stages:
            continue
        stage = stages[kind]
        registration = AffineRegistration(
            metric=MutualInformationMetric(nbins=stage.metric_bins, sampling_proportion=None),
            level_iters=list(stage.iterations), sigmas=list(stage.smoothing_sigmas),
            factors=list(stage.shrink_factors), verbosity=0,
        )
        affine = registration.optimize(fixed_data, moving_data, transform, None,
                                       static_grid2world=fixed.affine, moving_grid2world=moving.affine,
                                       starting_affine=affine).affine
    mapping = None
    if syn is not None:
        # DIPY's pyramid halves the grid at each level, coarsest first, and its CC needs more than
        # 2r+1 voxels per axis: keep the finest levels whose grids are that large
        smallest = min(fixed_data.shape)
        levels = [iterations for level, iterations in enumerate(syn.iterations[::-1])
                  if smallest // 2**level > 2 * syn.cc_radius + 1][::-1]
        mapping = SymmetricDiffeomorphicRegistration(
            CCMetric(3, radius=syn.cc_radius), level_iters=levels,
        ).optimize(fixed_data, moving_data, static_grid2world=fixed.affine,
                   moving_grid2world=moving.affine, prealign=affine)
    seconds = time.perf_counter() - started
    peak = peak_resident_bytes()
    if mapping is None:
        from dipy.align.imaffine import AffineMap

        mapping = AffineMap(affine, fixed_data.shape, fixed.affine, moving_data.shape, moving.affine)
    warped = mapping.transform(np.asarray(moving_labels.data, dtype=np.float64), interpolation="nearest")
    dice_mean, dice_by_label = mean_dice(fixed_labels.data, np.rint(warped).astype(np.int16))
    return {
        "arm": "dipy", "status": "completed", "seconds": seconds,
        "peak_bytes_above_baseline": peak - baseline, "baseline_bytes": baseline,
        "dice": dice_mean, "dice_by_label": dice_by_label, "final_losses": {}, "iterations": {},
    }


def benchmark_config(preset: str, threads: int, execution: str = "native", reference_losses: bool = False,
                     native_formats: tuple[str, ...] | None = None) -> Any:
    """The registration config every arm runs (ANTs and the engine alike).

    `execution`: how dynomp runs a format the device lacks ("native": the nearest native one;
    "virtual": emulated, every operation rounded to it, as a GPU would compute bf16 and fp16).
    `reference_losses`: the engine re-evaluates each level's final state in float64.
    `native_formats`: formats held in torch's own dtypes (None: the device's; see `PrecisionConfig`).
    """
    import dataclasses

    from dynomp.registration.config import paper_config, quick_config

    base = paper_config() if preset == "paper" else quick_config()
    precision = dataclasses.replace(base.precision, execution=execution, native_formats=native_formats)
    return dataclasses.replace(base, threads=threads, precision=precision, reference_losses=reference_losses)


def run_arm(arm: str, *, folder: Path, preset: str, threads: int, out: Path, device: str = "cpu",
            execution: str = "native", reference_losses: bool = False,
            native_formats: tuple[str, ...] | None = None) -> None:
    """Child-process entry: run one arm and write its measurements as JSON."""
    from dynomp.atomic import write_json_atomic

    config = benchmark_config(preset, threads, execution, reference_losses, native_formats)
    if arm in ENGINE_ARMS:
        result = run_engine_arm(arm, folder=folder, config=config, device=device)
    elif arm in ("ants-fp64", "ants-fp32"):
        result = run_ants_arm(arm, folder=folder, config=config)
    elif arm == "dipy":
        result = run_dipy_arm(folder=folder, config=config)
    else:
        raise ValueError(f"--run-arm: unknown arm {arm!r}")
    write_json_atomic(out, result)


def run_arms_in_one_process(arms: list[str], *, folder: Path, preset: str, threads: int, out: Path, rounds: int,
                            device: str = "cpu", execution: str = "native", reference_losses: bool = False,
                            native_formats: tuple[str, ...] | None = None) -> None:
    """Child-process entry of --one-process: the engine arms in turn, `rounds` times, the order
    reversed every other round; each registration measured as `run_engine_arm` measures it."""
    from dynomp.atomic import write_json_atomic

    config = benchmark_config(preset, threads, execution, reference_losses, native_formats)
    rows = []
    for round_ in range(rounds):
        for arm in arms if round_ % 2 == 0 else arms[::-1]:
            rows.append(run_engine_arm(arm, folder=folder, config=config, device=device))
    write_json_atomic(out, rows)


# ---------------------------------------------------------------------------------------------
# the table


def relative_loss_differences(candidate: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """|L - L_ref| / |L_ref| per stage x level present in both."""
    return {key: abs(candidate[key] - reference[key]) / abs(reference[key])
            for key in reference if key in candidate and reference[key] != 0}


def ratio(results: dict[str, dict[str, Any]], numerator: str, denominator: str, key: str) -> float:
    """results[numerator][key] / results[denominator][key], NaN when either arm is missing."""
    if numerator not in results or denominator not in results:
        return math.nan
    top, bottom = results[numerator].get(key), results[denominator].get(key)
    return top / bottom if top is not None and bottom else math.nan


def paired_ratio(results: dict[str, dict[str, Any]], numerator: str, denominator: str) -> float:
    """The median over rounds of numerator's time / denominator's time in the same round; NaN
    where either arm is missing or their runs do not pair up (a failed run)."""
    if numerator not in results or denominator not in results:
        return math.nan
    top = [run["seconds"] for run in results[numerator].get("runs", [])]
    bottom = [run["seconds"] for run in results[denominator].get("runs", [])]
    if not top or len(top) != len(bottom):
        return math.nan
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


def markdown_tables(results: dict[str, dict[str, Any]], *, device: str = "cpu") -> tuple[str, dict[str, Any]]:
    """The absolute table, the ratio table and the per-level loss table, and the checks as data.

    On `cuda` (the engine arms on the GPU; ANTs and DIPY always run on the CPU) the table adds the
    peak GPU memory and the checks add the GPU targets.
    """
    gpu = device == "cuda"
    lines = ["| arm | wall s | peak MB above imports | " + ("peak GPU MB | " if gpu else "")
             + "mean Dice | iterations |", "|---|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|"]
    for arm, row in results.items():
        gpu_cell = ""
        if gpu:
            gpu_cell = f"{row['peak_gpu_bytes'] / 2**20:.1f} | " if row.get("peak_gpu_bytes") is not None else "- | "
        lines.append(
            f"| {arm} | {row['seconds']:.1f} | {row['peak_bytes_above_baseline'] / 2**20:.1f} | {gpu_cell}"
            f"{row['dice']:.4f} | {sum(row['iterations'].values()) or '-'} |"
        )
    peers = [results[a]["dice"] for a in ("ants-fp64", "dipy") if a in results]
    best_peer = max(peers) if peers else math.nan
    def largest_loss_difference(candidate: str, reference: str) -> float:
        if candidate not in results or reference not in results:
            return math.nan
        differences = relative_loss_differences(results[candidate]["final_losses"],
                                                results[reference]["final_losses"])
        return max(differences.values()) if differences else math.nan

    loss_differences = (relative_loss_differences(results["dynomp"]["final_losses"], results["fp64"]["final_losses"])
                        if "dynomp" in results and "fp64" in results else {})
    checks = {
        "fp64 / ants-fp64 wall": (ratio(results, "fp64", "ants-fp64", "seconds"), "<= 0.23"),
        "dipy / ants-fp64 wall": (ratio(results, "dipy", "ants-fp64", "seconds"), "(peer)"),
        "fp64 Dice - best peer Dice": (
            results["fp64"]["dice"] - best_peer if "fp64" in results else math.nan, ">= -0.005"),
        "dynomp / fp64 wall": (ratio(results, "dynomp", "fp64", "seconds"), "<= 0.6"),
        "dynomp / fp64 peak memory": (ratio(results, "dynomp", "fp64", "peak_bytes_above_baseline"), "<= 0.6"),
        "dynomp Dice - fp64 Dice": (
            results["dynomp"]["dice"] - results["fp64"]["dice"]
            if "dynomp" in results and "fp64" in results else math.nan, "|.| <= 0.005"),
        "max relative final-loss difference dynomp vs fp64": (
            largest_loss_difference("dynomp", "fp64"), "<= 1e-3"),
        "fp32 / fp64 wall": (ratio(results, "fp32", "fp64", "seconds"), ""),
        "fp32 / fp64 peak memory": (ratio(results, "fp32", "fp64", "peak_bytes_above_baseline"), ""),
        "max relative final-loss difference fp32 vs fp64": (largest_loss_difference("fp32", "fp64"), ""),
        "ants-fp32 / ants-fp64 wall": (ratio(results, "ants-fp32", "ants-fp64", "seconds"), ""),
        "max relative final-loss difference ants-fp32 vs ants-fp64": (
            largest_loss_difference("ants-fp32", "ants-fp64"), ""),
    }
    # the engine arms run in rounds (fp64, fp32, dynomp, fp64, ...): a ratio taken within each round
    # and then its median is less moved by the host's speed drifting over minutes
    for numerator, denominator in (("dynomp", "fp64"), ("fp32", "fp64")):
        checks[f"{numerator} / {denominator} wall, median of per-round ratios"] = (
            paired_ratio(results, numerator, denominator), "")
    referenced = [arm for arm, row in results.items() if row.get("reference_losses")]
    compare = {"dynomp", "fp64"} <= set(referenced)
    reference_differences = (relative_loss_differences(results["dynomp"]["reference_losses"],
                                                       results["fp64"]["reference_losses"])
                             if compare else {})
    if reference_differences:
        checks["max relative float64-loss difference of the final states, dynomp vs fp64"] = (
            max(reference_differences.values()), "")
    if gpu:
        checks["GPU: dynomp / fp32 wall"] = (ratio(results, "dynomp", "fp32", "seconds"), "<= 0.6")
        checks["GPU: fp32 / ants-fp64 wall (CPU)"] = (ratio(results, "fp32", "ants-fp64", "seconds"), "<= 0.02")
        checks["GPU: dynomp / fp32 peak GPU memory"] = (ratio(results, "dynomp", "fp32", "peak_gpu_bytes"), "")
    lines += ["", "| comparison | value | target |", "|---|---:|---|"]
    for name, (value, target) in checks.items():
        lines.append(f"| {name} | {value:.4g} | {target} |")
    keys = sorted({k for row in results.values() for k in row["final_losses"]},
                  key=lambda k: (["rigid", "affine", "syn"].index(k.split("/")[0]), int(k.split("/")[1])))
    loss_arms = [arm for arm, row in results.items() if row["final_losses"]]
    if keys:
        lines += ["", "| stage/level | " + " | ".join(f"{a} final loss" for a in loss_arms)
                  + " | dynomp vs fp64 rel. diff |", "|---|" + "---:|" * (len(loss_arms) + 1)]
        for key in keys:
            values = [results[a]["final_losses"].get(key, math.nan) for a in loss_arms]
            difference = loss_differences.get(key, math.nan)
            lines.append(f"| {key} | " + " | ".join(f"{v:.6g}" for v in values) + f" | {difference:.2e} |")
    if keys and referenced:
        lines += ["", "| stage/level | " + " | ".join(f"{a} final state, float64 loss" for a in referenced)
                  + (" | dynomp vs fp64 rel. diff |" if compare else " |"),
                  "|---|" + "---:|" * (len(referenced) + compare)]
        for key in keys:
            values = [results[a]["reference_losses"].get(key, math.nan) for a in referenced]
            line = f"| {key} | " + " | ".join(f"{v:.6g}" for v in values) + " |"
            if compare:
                line += f" {reference_differences.get(key, math.nan):.2e} |"
            lines.append(line)
    timed = [arm for arm, row in results.items() if row.get("seconds_by_level")]
    if keys and timed:
        lines += ["", "| stage/level | " + " | ".join(f"{a} iteration s" for a in timed)
                  + (" | dynomp / fp64 |" if {"dynomp", "fp64"} <= set(timed) else " |"),
                  "|---|" + "---:|" * (len(timed) + ({"dynomp", "fp64"} <= set(timed)))]
        for key in keys:
            values = [results[a]["seconds_by_level"].get(key, math.nan) for a in timed]
            line = f"| {key} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
            if {"dynomp", "fp64"} <= set(timed):
                bottom = results["fp64"]["seconds_by_level"].get(key, math.nan)
                line += f" {results['dynomp']['seconds_by_level'].get(key, math.nan) / bottom:.2f} |"
            lines.append(line)
        totals = [sum(results[a]["seconds_by_level"].values()) for a in timed]
        lines.append("| all iterations | " + " | ".join(f"{v:.3f}" for v in totals) + " |"
                     + (f" {totals[timed.index('dynomp')] / totals[timed.index('fp64')]:.2f} |"
                        if {"dynomp", "fp64"} <= set(timed) else ""))
        outside = [results[a].get("seconds_outside_iterations", math.nan) for a in timed]
        lines.append("| outside the iterations | " + " | ".join(f"{v:.3f}" for v in outside) + " |"
                     + (f" {outside[timed.index('dynomp')] / outside[timed.index('fp64')]:.2f} |"
                        if {"dynomp", "fp64"} <= set(timed) else ""))
    return "\n".join(lines), {name: {"value": value, "target": target} for name, (value, target) in checks.items()}


def checkout(revision: str, folder: Path) -> str:
    """Check `revision` of this repository out into `folder` (a detached git worktree); return its
    commit. ValueError, naming the revision, where git cannot."""
    repository = Path(__file__).resolve().parents[1]
    found = subprocess.run(["git", "-C", str(repository), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise ValueError(f"--against: {revision!r} is not a commit of {repository}")
    commit = found.stdout.strip()
    added = subprocess.run(["git", "-C", str(repository), "worktree", "add", "--detach", "--quiet", str(folder), commit],
                           capture_output=True, text=True, check=False)
    if added.returncode != 0:
        message = (added.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"--against: git could not check out {revision!r}: {message}")
    return commit


def remove_checkout(folder: Path) -> None:
    """Remove the worktree `checkout` made (and git's record of it)."""
    repository = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repository), "worktree", "remove", "--force", str(folder)],
                   capture_output=True, check=False)


def comparison_table(results: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]], revision: str) -> str:
    """This tree's engine arms against the same arms run from `revision`: medians, the ratio of
    medians, the median of the per-round ratios, peak memory, and the largest relative final-loss
    difference between the two versions."""
    header = (f"| arm | this tree s | {revision} s | ratio of medians | median of per-round ratios | "
              f"peak MB, this tree / {revision} | largest relative final-loss difference | "
              f"mean Dice, this tree / {revision} |")
    lines = [header, "|---|---:|---:|---:|---:|---|---:|---|"]
    for arm, row in results.items():
        if arm not in base:
            continue
        old = base[arm]
        new_runs = [run["seconds"] for run in row["runs"]]
        old_runs = [run["seconds"] for run in old["runs"]]
        paired = (statistics.median(n / o for n, o in zip(new_runs, old_runs, strict=True))
                  if len(new_runs) == len(old_runs) else math.nan)
        differences = relative_loss_differences(row["final_losses"], old["final_losses"])
        largest = max(differences.values(), default=math.nan)
        lines.append(
            f"| {arm} | {row['seconds']:.3f} | {old['seconds']:.3f} | {row['seconds'] / old['seconds']:.3f} | "
            f"{paired:.3f} | {row['peak_bytes_above_baseline'] / 2**20:.1f} / "
            f"{old['peak_bytes_above_baseline'] / 2**20:.1f} | {largest:.1e} | {row['dice']:.4f} / {old['dice']:.4f} |"
        )
    return "\n".join(lines)


def median_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's repeated runs as one row: the run of median time, with the median peak memory, each
    level's median iteration time over the runs, and the median time outside the iterations (the
    wall time less the iterations': pyramid, set-up, inversions, output warps).

    Every run's time and peak are kept under "runs". The runs of one arm compute the same thing, so
    Dice and losses agree between them; they are taken from the median-time run.
    """
    ordered = sorted(rows, key=lambda row: row["seconds"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    peaks = sorted(r["peak_bytes_above_baseline"] for r in rows)
    row["peak_bytes_above_baseline"] = peaks[(len(peaks) - 1) // 2]
    if all(r.get("seconds_by_level") for r in rows):
        levels = list(dict.fromkeys(key for r in rows for key in r["seconds_by_level"]))
        row["seconds_by_level"] = {key: statistics.median(r["seconds_by_level"][key] for r in rows
                                                          if key in r["seconds_by_level"]) for key in levels}
        row["seconds_outside_iterations"] = statistics.median(
            r["seconds"] - sum(r["seconds_by_level"].values()) for r in rows)
    row["runs"] = [{"seconds": r["seconds"], "peak_bytes_above_baseline": r["peak_bytes_above_baseline"]}
                   for r in rows]
    return row


def main() -> None:
    """Build the pair, run every arm in its own child process, print and save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        help=f"arms to run (known: {', '.join(PEER_ARMS + ENGINE_ARMS)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the engine arms run (ANTs and DIPY run on the CPU)")
    parser.add_argument("--preset", choices=("paper", "quick"), default="paper")
    parser.add_argument("--execution", choices=("native", "virtual"), default="native",
                        help="dynomp's formats the device lacks: the nearest native one, or emulated "
                             "(virtual: what a GPU computes in bf16/fp16; the fixed bf16/fp16 arms "
                             "are emulated on a CPU either way)")
    parser.add_argument("--native-formats", nargs="+", metavar="FORMAT",
                        help="formats the engine arms hold in torch's own dtypes (default: the device's; "
                             "fp64 fp32 bf16 fp16 on a CPU runs the 16-bit arms in the tensors a GPU uses)")
    parser.add_argument("--reference-losses", action="store_true",
                        help="the engine arms re-evaluate each level's final state in float64 (an extra "
                             "table; its float64 copies count in the arms' time and peak memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each engine arm, interleaved; the median is reported (ANTs and DIPY run once)")
    parser.add_argument("--against", metavar="REV",
                        help="also run the engine arms from this commit (a temporary git worktree), "
                             "interleaved with this tree's, and compare the two arm by arm")
    parser.add_argument("--one-process", action="store_true",
                        help="run the engine arms' --repeats rounds in one child process, the arms in turn "
                             "(the order reversed every other round), rather than a child process each: "
                             "a process's speed on a shared host can differ from the next one's by 20-40 %%, "
                             "which one process takes out of each round's ratios; times only, "
                             "peak memory is reported as NaN in this mode")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/registration.json"))
    parser.add_argument("--run-arm", help=argparse.SUPPRESS)
    parser.add_argument("--run-arms", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pair", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_arms:
        run_arms_in_one_process(
            args.run_arms, folder=args.pair, preset=args.preset, threads=args.threads, out=args.arm_out,
            rounds=args.repeats, device=args.device, execution=args.execution,
            reference_losses=args.reference_losses,
            native_formats=tuple(args.native_formats) if args.native_formats else None)
        return
    if args.run_arm:
        run_arm(args.run_arm, folder=args.pair, preset=args.preset, threads=args.threads, out=args.arm_out,
                device=args.device, execution=args.execution, reference_losses=args.reference_losses,
                native_formats=tuple(args.native_formats) if args.native_formats else None)
        return
    for arm in args.arms:
        if arm not in PEER_ARMS + ENGINE_ARMS:
            parser.error(f"--arms: unknown arm {arm!r} (known: {', '.join(PEER_ARMS + ENGINE_ARMS)})")
    if args.native_formats:
        from dynomp.registration.config import PrecisionConfig

        try:
            PrecisionConfig(native_formats=tuple(args.native_formats))
        except ValueError as error:
            parser.error(f"--native-formats: {error}")
    from dynomp.atomic import write_json_atomic

    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    environment = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
        OPENBLAS_NUM_THREADS=str(args.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
    )
    peers = [arm for arm in args.arms if arm in PEER_ARMS]
    engines = [arm for arm in args.arms if arm in ENGINE_ARMS]
    if args.against and not engines:
        parser.error("--against: no engine arm among --arms")
    if args.one_process and (args.against or not engines):
        parser.error("--one-process: needs engine arms among --arms, and does not combine with --against")
    # (arm, script, source folder or None for this tree's); with --against each engine arm runs
    # from both trees in turn, the order alternating by round
    here = Path(__file__).resolve()
    schedule: list[tuple[str, Path, Path | None]] = [(arm, here, None) for arm in peers]
    runs: dict[str, list[dict[str, Any]]] = {}
    base_runs: dict[str, list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dynomp-bench-pair-") as work:
        folder = Path(work)
        base_commit = None
        if args.against:
            base_tree = folder / "base"
            try:
                base_commit = checkout(args.against, base_tree)
            except ValueError as error:
                parser.error(str(error))
            print(f"against {args.against} ({base_commit[:12]}), checked out in {base_tree}", flush=True)
        # with --one-process the engine arms run in one child (below), not one child per run
        for round_ in range(0 if args.one_process else args.repeats):
            for arm in engines:
                pair_of_runs = [(arm, here, None)]
                if base_commit is not None:
                    base_run = (arm, base_tree / "benchmarks" / "registration.py", base_tree / "src")
                    pair_of_runs = [pair_of_runs[0], base_run] if round_ % 2 == 0 else [base_run, pair_of_runs[0]]
                schedule.extend(pair_of_runs)
        pair = build_pair(seed=args.seed)
        write_pair(pair, folder)
        before, _ = mean_dice(pair["fixed_labels"], pair["moving_labels"])
        print(f"pair: {pair['fixed'].shape} voxels of {VOXEL_MM:g} mm, mean Dice before registration "
              f"{before:.4f}", flush=True)
        child_arguments = ["--preset", args.preset, "--threads", str(args.threads), "--device", args.device,
                           "--execution", args.execution, *(["--reference-losses"] if args.reference_losses else []),
                           *(["--native-formats", *args.native_formats] if args.native_formats else [])]
        if args.one_process:
            arms_out = folder / "engine-arms.json"
            completed = subprocess.run(
                [sys.executable, str(here), "--run-arms", *engines, "--repeats", str(args.repeats), "--pair",
                 str(folder), "--arm-out", str(arms_out), *child_arguments],
                env=environment, capture_output=True, text=True, check=False,
            )
            if completed.returncode != 0:
                tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"engine arms in one process: failed (exit {completed.returncode}): {tail}", flush=True)
            else:
                for row in json.loads(arms_out.read_text()):
                    # a heap that earlier registrations grew is reused, and the kernel's peak counter
                    # sees only what this registration added to it: not the arm's memory (kept aside)
                    row["peak_bytes_in_shared_process"] = row["peak_bytes_above_baseline"]
                    row["peak_bytes_above_baseline"] = math.nan
                    runs.setdefault(row["arm"], []).append(row)
                    print(f"{row['arm']}: {row['seconds']:.2f} s, Dice {row['dice']:.4f}", flush=True)
        try:
            for arm, script, source in schedule:
                arm_out = folder / f"{arm}.json"
                child_environment = environment
                if source is not None:
                    child_environment = dict(environment, PYTHONPATH=os.pathsep.join(
                        [str(source), *filter(None, [environment.get("PYTHONPATH")])]))
                label = arm if source is None else f"{arm} ({args.against})"
                completed = subprocess.run(
                    [sys.executable, str(script), "--run-arm", arm, "--pair", str(folder), "--arm-out", str(arm_out),
                     *child_arguments],
                    env=child_environment, capture_output=True, text=True, check=False,
                )
                if completed.returncode != 0:
                    tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{label}: failed (exit {completed.returncode}): {tail}", flush=True)
                    continue
                row = json.loads(arm_out.read_text())
                (runs if source is None else base_runs).setdefault(arm, []).append(row)
                print(f"{label}: {row['seconds']:.1f} s, {row['peak_bytes_above_baseline'] / 2**20:.1f} MB, "
                      f"Dice {row['dice']:.4f}", flush=True)
        finally:
            if base_commit is not None:
                remove_checkout(base_tree)
    results = {arm: median_run(runs[arm]) for arm in args.arms if arm in runs}
    table, checks = markdown_tables(results, device=args.device)
    print()
    print(table)
    against = None
    if base_commit is not None:
        base_results = {arm: median_run(base_runs[arm]) for arm in engines if arm in base_runs}
        comparison = comparison_table(results, base_results, args.against)
        print()
        print(comparison)
        against = {"revision": args.against, "commit": base_commit, "results": base_results, "table": comparison}
    write_json_atomic(args.out, {
        "command": " ".join(["benchmarks/registration.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "repeats": args.repeats, "one_process": args.one_process, "device": args.device,
        "pair": {"shape": list(pair["fixed"].shape), "voxel_mm": VOXEL_MM, "seed": args.seed,
                 "dice_before": before},
        "preset": args.preset, "execution": args.execution, "native_formats": args.native_formats,
        "results": results, "checks": checks, "table": table,
        "against": against,
    })


if __name__ == "__main__":
    main()
