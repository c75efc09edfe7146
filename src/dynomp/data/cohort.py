"""The embedded cohort: synthetic subjects with known deformations, made from the MNI152 2009a template.

Every subject is the template's head model seen through a known transform. In world coordinates
(RAS millimetres), a subject point x shows the template point

    y = phi(A x),    phi(z) = z + u(z),

where A is a random affine misalignment (rotation up to `rotation_degrees` about each axis,
translation up to `translation_mm`, and a little scaling and shear, about the brain's centre) and
phi is a random smooth diffeomorphism: the exponential of a stationary velocity field (Gaussian-
smoothed noise whose largest component is `velocity_mm`), integrated by scaling and squaring.

The head model lives in template space: the template's brain (skull-stripped T1 intensities),
then shells at fixed distances outside a smoothed brain outline: CSF (dark), skull (darker) and
scalp (bright). The subject's T1w is that model at y, times a smooth multiplicative bias field
(exp of a random quadratic), with Rician noise. The true labels and brain mask are the template's,
also sampled at y (nearest neighbour).

Outputs follow BIDS (raw images) and BIDS-derivatives (`derivatives/truth`): the labels and mask
in subject space, the subject's brain and labels with the affine removed (template grid, phi(z):
the analogue of neurite-OASIS's aligned_norm), and the true transform in ANTs' terms: u as an ITK
displacement field (LPS mm, (X, Y, Z, 1, 3)) on the coarse grid where it is defined, and A as an
ITK affine, so `antsApplyTransforms -r sub_T1w -i template -t xfm.nii.gz -t xfm.txt` puts the
template on the subject; `load_true_transform` reads both back. The whole folder is saved as a
DataLad dataset; it is built in a temporary sibling folder and renamed into place when complete.

Seeds: subject k's generator is `SeedSequence(seed).spawn(k + 1)[k]`, so a subject does not
change when the cohort grows.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from dynomp import __version__
from dynomp.atomic import write_json_atomic, write_text_atomic
from dynomp.data.nifti import write_itk_displacement, write_volume
from dynomp.data.sources import remove_tree, save_as_dataset
from dynomp.data.templates import TEMPLATE_NAME, Template, label_table_tsv, template_at_resolution

BIDS_VERSION = "1.9.0"
SPACE = TEMPLATE_NAME
MAX_SUBJECTS = 99
# Distances (mm) from the smoothed brain outline at which each head shell ends.
CSF_SHELL_MM = 3.0
SKULL_SHELL_MM = 9.0
SCALP_SHELL_MM = 15.0
# T1-weighted intensities on the template's scale (its WM is about 0.86, its GM 0.65, its CSF 0.34).
CSF_INTENSITY = 0.25
SKULL_INTENSITY = 0.05
SCALP_INTENSITY = 0.80
# The subject grid is the brain's bounding box plus this margin: the scalp (15 mm), the misalignment
# (8 mm shift, 8 degrees at 100 mm from the centre: 14 mm) and the warp must stay inside it.
FIELD_OF_VIEW_MARGIN_MM = 40.0
# The velocity field is smooth on this scale, so it is integrated on a grid this coarse (or the
# image grid, when coarser) and interpolated to the images: 8x fewer points at 2 mm.
WARP_GRID_MM = 4.0
SQUARINGS = 6
T1W_SCALE = 1000.0
# ITK's 3-D affine transforms are in LPS: flip x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class CohortSettings:
    """How the subjects differ from the template; the defaults are the embedded cohort's."""

    rotation_degrees: float = 8.0
    translation_mm: float = 8.0
    scale_fraction: float = 0.05
    shear: float = 0.03
    velocity_mm: float = 5.0
    velocity_smoothing_mm: float = 12.0
    bias_strength: float = 0.2
    noise_fraction: float = 0.02

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if self.velocity_smoothing_mm == 0:
            raise ValueError(
                f"velocity_smoothing_mm: must be > 0, got {self.velocity_smoothing_mm}"
            )


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape and voxel-to-world affine (RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def world_points(self) -> np.ndarray:
        """World coordinates (3, *shape) of every voxel centre."""
        indices = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape], indexing="ij")
        )
        return (
            np.einsum("ij,j...->i...", self.affine[:3, :3], indices)
            + self.affine[:3, 3, None, None, None]
        )

    def voxel_coordinates(self, points: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (3, ...) of world points (3, ...)."""
        inverse = np.linalg.inv(self.affine)
        return np.einsum("ij,j...->i...", inverse[:3, :3], points) + inverse[:3, 3].reshape(
            (3,) + (1,) * (points.ndim - 1)
        )


@dataclass(frozen=True)
class HeadModel:
    """The template's head on the subject grid, in template space: T1 intensities (brain and shells), labels."""

    grid: Grid
    intensity: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SubjectTransform:
    """A subject's true transform: y = phi(A x), phi(z) = z + u(z), u on `warp_grid` (mm, (3, *shape))."""

    affine: np.ndarray
    warp_grid: Grid
    displacement_mm: np.ndarray
    parameters: dict

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Template points y (3, ...) of subject world points x (3, ...)."""
        return self.warp(
            np.einsum("ij,j...->i...", self.affine[:3, :3], points)
            + self.affine[:3, 3].reshape((3,) + (1,) * (points.ndim - 1))
        )

    def warp(self, points: np.ndarray) -> np.ndarray:
        """phi(z) = z + u(z) for template-space points z (3, ...); trilinear in u."""
        coordinates = self.warp_grid.voxel_coordinates(points)
        return points + np.stack(
            [
                ndimage.map_coordinates(component, coordinates, order=1, mode="nearest")
                for component in self.displacement_mm
            ]
        )


def subject_id(index: int) -> str:
    """BIDS subject label of the index-th subject (0-based): '01', '02', ..."""
    return f"{index + 1:02d}"


def _subject_grid(template: Template) -> tuple[Grid, tuple[int, int, int]]:
    """The subject grid (brain bounding box + margin, aligned with the template's voxels) and its offset."""
    resolution = template.resolution
    occupied = np.argwhere(template.brain_mask)
    margin = math.ceil(FIELD_OF_VIEW_MARGIN_MM / resolution)
    start = occupied.min(axis=0) - margin
    stop = occupied.max(axis=0) + margin + 1
    affine = template.affine.copy()
    affine[:3, 3] = template.affine[:3, 3] + resolution * start
    shape = tuple(int(n) for n in stop - start)
    return Grid(shape=shape, affine=affine), tuple(int(n) for n in start)


def _embed(array: np.ndarray, *, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """`array` placed in a zero array of `shape` whose voxel 0 is `array`'s voxel `start`."""
    result = np.zeros(shape, dtype=array.dtype)
    source = tuple(
        slice(max(0, s), min(n, s + m)) for s, n, m in zip(start, array.shape, shape, strict=True)
    )
    target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, start, strict=True))
    result[target] = array[source]
    return result


def build_head_model(template: Template) -> HeadModel:
    """The template brain wrapped in CSF, skull and scalp shells, on the (larger) subject grid."""
    grid, start = _subject_grid(template)
    resolution = template.resolution
    brain = _embed(np.asarray(template.brain_mask), start=start, shape=grid.shape)
    t1 = _embed(np.asarray(template.t1), start=start, shape=grid.shape)
    labels = _embed(np.asarray(template.labels), start=start, shape=grid.shape)
    # the skull follows the brain's outline, not its gyri: measure from a smoothed brain
    outline = (ndimage.gaussian_filter(brain.astype(np.float32), 4.0 / resolution) > 0.25) | brain
    distance = ndimage.distance_transform_edt(~outline, sampling=resolution)
    shells = np.select(
        [outline, distance <= CSF_SHELL_MM, distance <= SKULL_SHELL_MM, distance <= SCALP_SHELL_MM],
        [CSF_INTENSITY, CSF_INTENSITY, SKULL_INTENSITY, SCALP_INTENSITY],
        default=0.0,
    ).astype(np.float32)
    # partial volume at the shells' borders (1 mm), as a scanner's point spread would give
    shells = ndimage.gaussian_filter(shells, 1.0 / resolution)
    intensity = np.where(brain, t1, shells).astype(np.float32)
    return HeadModel(grid=grid, intensity=intensity, labels=labels)


def random_affine(
    rng: np.random.Generator, *, center: np.ndarray, settings: CohortSettings
) -> tuple[np.ndarray, dict]:
    """A 4x4 affine (subject world -> template world): rotation, scaling, shear and shift about `center`."""
    degrees = rng.uniform(-settings.rotation_degrees, settings.rotation_degrees, size=3)
    shift = rng.uniform(-settings.translation_mm, settings.translation_mm, size=3)
    scales = 1.0 + rng.uniform(-settings.scale_fraction, settings.scale_fraction, size=3)
    shears = rng.uniform(-settings.shear, settings.shear, size=3)
    shear_matrix = np.array([[1.0, shears[0], shears[1]], [0.0, 1.0, shears[2]], [0.0, 0.0, 1.0]])
    linear = (
        Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
        @ np.diag(scales)
        @ shear_matrix
    )
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = center - linear @ center + shift
    parameters = {
        "RotationDegrees": degrees.tolist(),
        "TranslationMm": shift.tolist(),
        "Scales": scales.tolist(),
        "Shears": shears.tolist(),
        "CenterMm": center.tolist(),
    }
    return affine, parameters


def integrate_velocity(velocity: np.ndarray, *, squarings: int = SQUARINGS) -> np.ndarray:
    """exp(v) by scaling and squaring: displacement (3, *shape) in voxels of a stationary velocity in voxels."""
    grid = np.stack(
        np.meshgrid(*[np.arange(n, dtype=np.float64) for n in velocity.shape[1:]], indexing="ij")
    )
    displacement = velocity / 2**squarings
    for _ in range(squarings):
        # u <- u + u o (id + u): composing the half-time flow with itself
        displacement = displacement + np.stack(
            [
                ndimage.map_coordinates(component, grid + displacement, order=1, mode="nearest")
                for component in displacement
            ]
        )
    return displacement


def random_warp(rng: np.random.Generator, *, grid: Grid, settings: CohortSettings) -> np.ndarray:
    """A smooth diffeomorphic displacement (3, *shape) in mm on `grid`: exp of a smoothed random velocity."""
    spacing = float(grid.affine[0, 0])
    noise = rng.normal(size=(3, *grid.shape))
    velocity = np.stack(
        [
            ndimage.gaussian_filter(component, settings.velocity_smoothing_mm / spacing)
            for component in noise
        ]
    )
    velocity *= (settings.velocity_mm / spacing) / np.abs(velocity).max()
    return integrate_velocity(velocity) * spacing


def _warp_grid(subject_grid: Grid, resolution: float) -> Grid:
    """A grid at WARP_GRID_MM (or coarser) that covers the subject grid with 24 mm to spare."""
    spacing = max(WARP_GRID_MM, resolution)
    lower = subject_grid.affine[:3, 3] - 24.0
    upper = subject_grid.affine[:3, 3] + resolution * (np.array(subject_grid.shape) - 1) + 24.0
    shape = tuple(math.ceil((hi - lo) / spacing) + 1 for lo, hi in zip(lower, upper, strict=True))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lower
    return Grid(shape=shape, affine=affine)


def random_subject_transform(
    rng: np.random.Generator, *, head: HeadModel, template: Template, settings: CohortSettings
) -> SubjectTransform:
    """A subject's affine misalignment and diffeomorphic warp, drawn from `rng`."""
    brain_voxels = np.argwhere(template.brain_mask).mean(axis=0)
    center = template.affine[:3, :3] @ brain_voxels + template.affine[:3, 3]
    affine, parameters = random_affine(rng, center=center, settings=settings)
    warp_grid = _warp_grid(head.grid, template.resolution)
    displacement = random_warp(rng, grid=warp_grid, settings=settings)
    parameters |= {
        "VelocityMaxMm": settings.velocity_mm,
        "VelocitySmoothingMm": settings.velocity_smoothing_mm,
        "Squarings": SQUARINGS,
        "WarpGridMm": float(warp_grid.affine[0, 0]),
    }
    return SubjectTransform(
        affine=affine, warp_grid=warp_grid, displacement_mm=displacement, parameters=parameters
    )


def bias_field(rng: np.random.Generator, *, grid: Grid, strength: float) -> np.ndarray:
    """A smooth multiplicative field exp(q(x)), q a random quadratic with max |q| = strength."""
    coordinates = [np.linspace(-1.0, 1.0, n) for n in grid.shape]
    x, y, z = np.meshgrid(*coordinates, indexing="ij", sparse=True)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_field = sum(
        coefficient * term
        for coefficient, term in zip(rng.normal(size=len(terms)), terms, strict=True)
    )
    log_field = np.broadcast_to(log_field, grid.shape)
    log_field = log_field - log_field.mean()
    return np.exp(strength * log_field / np.abs(log_field).max())


def write_displacement_field(path: Path, displacement_ras: np.ndarray, affine: np.ndarray) -> Path:
    """A displacement field (3, *shape) in RAS mm, written as ITK reads it: (X, Y, Z, 1, 3), LPS mm."""
    return write_itk_displacement(path, np.moveaxis(displacement_ras, 0, -1), affine, dtype="float32")


def write_itk_affine(path: Path, affine_ras: np.ndarray) -> Path:
    """A 4x4 RAS affine (output point -> input point) as an ITK text AffineTransform_double_3_3 (LPS)."""
    lps = RAS_TO_LPS @ affine_ras @ RAS_TO_LPS
    parameters = " ".join(f"{value:.17g}" for value in [*lps[:3, :3].ravel(), *lps[:3, 3]])
    return write_text_atomic(
        path,
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {parameters}\nFixedParameters: 0 0 0\n",
    )


def read_displacement_field(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(displacement (3, *shape) in RAS mm, affine) of a field written by write_displacement_field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such displacement field")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim != 5 or data.shape[3:] != (1, 3):
        raise ValueError(
            f"{path}: expected an ITK displacement field of shape (X, Y, Z, 1, 3), got {data.shape}"
        )
    ras = data[:, :, :, 0, :] * np.array([-1.0, -1.0, 1.0])
    return np.moveaxis(ras, -1, 0), np.asarray(image.affine, dtype=np.float64)


def _sample(volume: np.ndarray, grid: Grid, points: np.ndarray, *, order: int) -> np.ndarray:
    return ndimage.map_coordinates(
        volume, grid.voxel_coordinates(points), order=order, mode="constant", cval=0
    )


def _write_subject(
    root: Path,
    *,
    index: int,
    template: Template,
    head: HeadModel,
    rng: np.random.Generator,
    settings: CohortSettings,
) -> dict:
    """Draw one subject and write its raw image and its ground truth; return its participants row."""
    label = subject_id(index)
    transform = random_subject_transform(rng, head=head, template=template, settings=settings)
    grid = head.grid
    subject_points = grid.world_points()
    template_points = transform.apply(subject_points)
    intensity = _sample(head.intensity, grid, template_points, order=1).clip(min=0.0)
    labels = _sample(head.labels, grid, template_points, order=0).astype(np.uint8)
    biased = intensity * bias_field(rng, grid=grid, strength=settings.bias_strength)
    noise = rng.normal(scale=settings.noise_fraction, size=(2, *grid.shape))
    # Rician: magnitude of a complex signal with Gaussian noise in both channels
    t1w = np.sqrt((biased + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)

    anat = root / f"sub-{label}" / "anat"
    # stored as scanners store T1w images: int16 (here 1000 = the template's maximum intensity)
    write_volume(
        anat / f"sub-{label}_T1w.nii.gz", np.round(t1w * T1W_SCALE), grid.affine, dtype="int16"
    )
    truth = root / "derivatives" / "truth" / f"sub-{label}"
    write_volume(
        truth / "anat" / f"sub-{label}_desc-brain_mask.nii.gz",
        labels > 0,
        grid.affine,
        dtype="uint8",
    )
    write_volume(truth / "anat" / f"sub-{label}_dseg.nii.gz", labels, grid.affine, dtype="uint8")

    # affine removed: on the template grid, the subject shows the template at phi(z)
    template_grid = Grid(shape=template.t1.shape, affine=template.affine)
    grid_points = template_grid.world_points()
    warped_points = transform.warp(grid_points)
    aligned_t1 = _sample(np.asarray(template.t1), template_grid, warped_points, order=1).clip(
        0.0, 1.0
    )
    aligned_labels = _sample(np.asarray(template.labels), template_grid, warped_points, order=0)
    prefix = f"sub-{label}_space-{SPACE}"
    write_volume(
        truth / "anat" / f"{prefix}_desc-preproc_T1w.nii.gz",
        aligned_t1,
        template.affine,
        dtype="float32",
    )
    write_volume(
        truth / "anat" / f"{prefix}_dseg.nii.gz", aligned_labels, template.affine, dtype="uint8"
    )

    xfm = truth / "xfm" / f"sub-{label}_from-{SPACE}_to-T1w_mode-image_xfm"
    write_displacement_field(
        xfm.with_suffix(".nii.gz"), transform.displacement_mm, transform.warp_grid.affine
    )
    write_itk_affine(xfm.with_suffix(".txt"), transform.affine)
    write_json_atomic(
        xfm.with_suffix(".json"),
        {
            "Description": "True transform of the template onto the subject: a subject point x (RAS mm) shows "
            "the template point y = phi(A x), phi(z) = z + u(z). With ANTs: antsApplyTransforms "
            f"-r sub-{label}_T1w.nii.gz -i <template> -t {xfm.name}.nii.gz -t {xfm.name}.txt",
            "AffineMatrix": transform.affine.tolist(),
            "AffineDescription": f"A: subject world (RAS mm) -> template world (RAS mm), applied first; "
            f"{xfm.name}.txt holds it as an ITK AffineTransform (LPS)",
            "DisplacementField": f"{xfm.name}.nii.gz: u on its own template-space grid, where phi is defined "
            "(trilinear between grid points)",
            "DisplacementConvention": "ITK: shape (X, Y, Z, 1, 3), LPS millimetres, offset from each voxel centre",
            **transform.parameters,
        },
    )
    return {
        "participant_id": f"sub-{label}",
        "rotation_degrees": float(np.abs(transform.parameters["RotationDegrees"]).max()),
        "translation_mm": float(np.linalg.norm(transform.parameters["TranslationMm"])),
    }


def _write_dataset_files(
    root: Path, *, rows: list[dict], subjects: int, resolution: float, seed: int
) -> None:
    generated_by = [
        {
            "Name": "dynomp",
            "Version": __version__,
            "Description": f"dynomp cohort --subjects {subjects} --resolution {resolution:g} --seed {seed}",
        }
    ]
    write_json_atomic(
        root / "dataset_description.json",
        {
            "Name": "dynomp embedded cohort (synthetic subjects from MNI152NLin2009aSym)",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "GeneratedBy": generated_by,
        },
    )
    header = "participant_id\tmax_rotation_degrees\ttranslation_mm"
    lines = [header] + [
        f"{row['participant_id']}\t{row['rotation_degrees']:.3f}\t{row['translation_mm']:.3f}"
        for row in rows
    ]
    write_text_atomic(root / "participants.tsv", "\n".join(lines) + "\n")
    write_json_atomic(
        root / "participants.json",
        {
            "max_rotation_degrees": {
                "Description": "largest rotation about one axis of the true misalignment",
                "Units": "degree",
            },
            "translation_mm": {
                "Description": "length of the true misalignment's translation",
                "Units": "mm",
            },
        },
    )
    write_text_atomic(
        root / "README",
        (
            "dynomp embedded cohort\n\n"
            f"{subjects} synthetic T1-weighted heads at {resolution:g} mm (seed {seed}). Each is the MNI152 2009a\n"
            "symmetric template (nilearn's copy) wrapped in CSF, skull and scalp shells, deformed by a random\n"
            "diffeomorphism (scaling and squaring of a smooth velocity field) and a random affine misalignment,\n"
            "with a smooth bias field and Rician noise. derivatives/truth holds the true brain masks, label maps\n"
            "(CSF, GM, WM x left/right, see dseg.tsv), affinely aligned brains and the true transforms.\n"
        ),
    )
    truth = root / "derivatives" / "truth"
    write_json_atomic(
        truth / "dataset_description.json",
        {
            "Name": "dynomp embedded cohort: ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
            "SourceDatasets": [{"URL": "../.."}],
        },
    )
    write_text_atomic(truth / "dseg.tsv", label_table_tsv())


def check_cohort_arguments(*, subjects: int, resolution: float, seed: int) -> None:
    """ValueError naming the argument unless subjects, resolution and seed are usable."""
    if (
        isinstance(subjects, bool)
        or not isinstance(subjects, int)
        or not 1 <= subjects <= MAX_SUBJECTS
    ):
        raise ValueError(f"--subjects: need an integer from 1 to {MAX_SUBJECTS}, got {subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed: need a non-negative integer, got {seed!r}")
    if (
        not isinstance(resolution, int | float)
        or not math.isfinite(resolution)
        or not 0.5 <= resolution <= 8.0
    ):
        raise ValueError(f"--resolution: must be between 0.5 and 8 mm, got {resolution!r}")


def build_cohort(
    out: Path,
    *,
    subjects: int = 8,
    resolution: float = 2.0,
    seed: int = 0,
    settings: CohortSettings | None = None,
    datalad: bool = True,
) -> Path:
    """Build the embedded cohort (BIDS + derivatives/truth) at `out`, saved as a DataLad dataset."""
    check_cohort_arguments(subjects=subjects, resolution=resolution, seed=seed)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} already exists and is not an empty directory")
    settings = settings or CohortSettings()
    template = template_at_resolution(resolution)
    head = build_head_model(template)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    try:
        generators = [
            np.random.default_rng(sequence)
            for sequence in np.random.SeedSequence(seed).spawn(subjects)
        ]
        rows = [
            _write_subject(
                building,
                index=index,
                template=template,
                head=head,
                rng=generator,
                settings=settings,
            )
            for index, generator in enumerate(generators)
        ]
        _write_dataset_files(
            building, rows=rows, subjects=subjects, resolution=resolution, seed=seed
        )
        if datalad:
            save_as_dataset(
                building,
                message=f"Embedded cohort: {subjects} subjects at {resolution:g} mm, seed {seed}",
            )
        if out.exists():
            out.rmdir()
        os.replace(building, out)
    finally:
        remove_tree(building)
    return out


def load_true_transform(cohort: str | os.PathLike, subject: str) -> SubjectTransform:
    """A subject's true transform (affine and warp) read back from the cohort's derivatives/truth."""
    label = subject.removeprefix("sub-")
    stem = (
        Path(cohort)
        / "derivatives"
        / "truth"
        / f"sub-{label}"
        / "xfm"
        / f"sub-{label}_from-{SPACE}_to-T1w_mode-image_xfm"
    )
    sidecar = stem.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{sidecar}: no such transform sidecar (is sub-{label} in the cohort?)"
        )
    try:
        parameters = json.loads(sidecar.read_text())
        affine = np.asarray(parameters["AffineMatrix"], dtype=np.float64)
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{sidecar}: not a transform sidecar ({error})") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{sidecar}: AffineMatrix must be a finite 4x4 matrix")
    displacement, grid_affine = read_displacement_field(stem.with_suffix(".nii.gz"))
    grid = Grid(shape=tuple(int(n) for n in displacement.shape[1:]), affine=grid_affine)
    return SubjectTransform(
        affine=affine, warp_grid=grid, displacement_mm=displacement, parameters=parameters
    )
