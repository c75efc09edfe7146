"""The MNI152 2009a symmetric template, from the files nilearn ships, and a TemplateFlow home that holds it.

nilearn ships the skull-stripped 1 mm T1 and the GM and WM probability maps of ICBM 152 2009a
(symmetric), so everything here works offline. `template_at_resolution` resamples them to any
voxel size and derives a brain mask (nilearn's own rule: T1 above 20 % of its maximum, holes
filled), a CSF map (brain minus GM and WM) and a six-label map: CSF, GM and WM, each split into
left and right at the midline (x = 0 mm in MNI space). No finer regions are made: the tissue maps
and coordinates alone do not delimit lobes or the cerebellum honestly.

`build_template_home` writes tpl-MNI152NLin2009aSym at res-01 and res-02 into a TemplateFlow home,
named as TemplateFlow names its files, so that `templateflow.api.get` resolves them with no network.
`get_template` is that same `get` for any template (on a machine with a network it downloads
missing files, e.g. MNI152NLin2009cAsym for real studies).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dynomp.atomic import write_json_atomic, write_text_atomic
from dynomp.data.nifti import write_volume

TEMPLATE_NAME = "MNI152NLin2009aSym"
TEMPLATE_RESOLUTIONS = (1, 2)
# nilearn's load_mni152_brain_mask threshold, as a fraction of the T1's maximum
BRAIN_THRESHOLD = 0.2
LABEL_NAMES = {1: "CSF-L", 2: "CSF-R", 3: "GM-L", 4: "GM-R", 5: "WM-L", 6: "WM-R"}
TISSUES = ("CSF", "GM", "WM")


@dataclass(frozen=True)
class Template:
    """The template on one grid: T1 in [0, 1], brain mask, tissue probabilities and six labels."""

    t1: np.ndarray
    brain_mask: np.ndarray
    probabilities: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray

    @property
    def resolution(self) -> float:
        """Voxel size in millimetres."""
        return float(self.affine[0, 0])


def nilearn_template_files() -> dict[str, Path]:
    """Paths of the MNI152 2009a T1, GM and WM files that nilearn ships."""
    import nilearn.datasets

    folder = Path(nilearn.datasets.__file__).parent / "data"
    files = {
        kind: folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
        for kind in ("t1", "gm", "wm")
    }
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nilearn's bundled MNI152 2009a file is missing")
    return files


def check_resolution(resolution: float) -> float:
    """The resolution as a float; ValueError unless it is a finite size between 0.5 and 8 mm."""
    value = float(resolution)
    if not math.isfinite(value) or not 0.5 <= value <= 8.0:
        raise ValueError(f"--resolution: must be between 0.5 and 8 mm, got {resolution}")
    return value


def template_grid(resolution: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the template's field of view at `resolution` mm, as TemplateFlow derives res-NN.

    TemplateFlow's coarser grids keep the 1 mm grid's centre: origin_R = origin_1 - (R - 1) / 2
    and shape_R = ceil(shape_1 / R) (e.g. MNI152NLin2009cAsym: 193 -> 97 at 2 mm, origin -96 -> -96.5).
    """
    resolution = check_resolution(resolution)
    source = nib.load(str(nilearn_template_files()["t1"]))
    origin = source.affine[:3, 3] - (resolution - 1.0) / 2.0
    shape = tuple(math.ceil(n / resolution - 1e-9) for n in source.shape[:3])
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = origin
    return shape, affine


def _block_average(volume: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Mean over factor^3 blocks, on TemplateFlow's res-NN grid (first block padded by factor - 1)."""
    padded = np.zeros(tuple(n * factor for n in shape), dtype=np.float32)
    pad = factor - 1
    extent = tuple(min(n, p - pad) for n, p in zip(volume.shape, padded.shape, strict=True))
    padded[pad : pad + extent[0], pad : pad + extent[1], pad : pad + extent[2]] = volume[
        : extent[0], : extent[1], : extent[2]
    ]
    blocks = padded.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    return blocks.mean(axis=(1, 3, 5))


def _resample(
    volume: np.ndarray,
    *,
    resolution: float,
    source_affine: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, ...],
) -> np.ndarray:
    """A 1 mm volume on the grid (shape, affine) at `resolution` mm, without aliasing."""
    if resolution == 1.0:
        return volume.astype(np.float32)
    if resolution == int(resolution):
        # an integer factor: the block mean is the exact partial-volume average (and 20x faster)
        return _block_average(volume, int(resolution), shape)
    sigma = math.sqrt(resolution**2 - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    voxel_to_source = np.linalg.solve(source_affine, affine)
    points = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    points = (
        np.einsum("ij,j...->i...", voxel_to_source[:3, :3], points)
        + voxel_to_source[:3, 3, None, None, None]
    )
    smoothed = ndimage.gaussian_filter(volume.astype(np.float32), sigma)
    return ndimage.map_coordinates(smoothed, points, order=1, mode="constant", cval=0.0)


@lru_cache(maxsize=4)
def _template_at_resolution(resolution: float) -> Template:
    files = nilearn_template_files()
    source = nib.load(str(files["t1"]))
    t1 = np.asarray(source.dataobj, dtype=np.float32)
    t1 /= t1.max()
    gm = np.asarray(nib.load(str(files["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(files["wm"])).dataobj, dtype=np.float32) / 255.0
    brain = (t1 > BRAIN_THRESHOLD).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    shape, affine = template_grid(resolution)
    maps = {
        name: _resample(
            volume, resolution=resolution, source_affine=source.affine, affine=affine, shape=shape
        )
        for name, volume in {"t1": t1, "brain": brain, "CSF": csf, "GM": gm, "WM": wm}.items()
    }
    # filled at the target grid: at 1 mm the fill adds 6 voxels, at any coarser grid it is cheaper
    brain_mask = ndimage.binary_fill_holes(maps["brain"] > 0.5)
    probabilities = {
        name: (np.clip(maps[name], 0.0, 1.0) * brain_mask).astype(np.float32) for name in TISSUES
    }
    tissue = np.argmax(np.stack([probabilities[name] for name in TISSUES]), axis=0)
    x_world = affine[0, 0] * np.arange(shape[0]) + affine[0, 3]
    right = np.broadcast_to((x_world > 0)[:, None, None], shape)
    labels = np.where(brain_mask, 1 + 2 * tissue + right, 0).astype(np.uint8)
    t1 = (np.clip(maps["t1"], 0.0, 1.0) * brain_mask).astype(np.float32)
    for array in (t1, brain_mask, labels, *probabilities.values()):
        array.setflags(write=False)
    return Template(
        t1=t1, brain_mask=brain_mask, probabilities=probabilities, labels=labels, affine=affine
    )


def template_at_resolution(resolution: float) -> Template:
    """The MNI152 2009a template resampled to `resolution` mm, with brain mask, tissues and six labels."""
    return _template_at_resolution(check_resolution(resolution))


def label_table_tsv() -> str:
    """The six labels as a BIDS dseg.tsv (index, name)."""
    rows = ["index\tname"] + [f"{index}\t{name}" for index, name in LABEL_NAMES.items()]
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------
# TemplateFlow


def template_file_name(*, resolution: int, entities: str) -> str:
    """A TemplateFlow file name, e.g. tpl-MNI152NLin2009aSym_res-01_desc-brain_T1w.nii.gz."""
    return f"tpl-{TEMPLATE_NAME}_res-{resolution:02d}_{entities}.nii.gz"


def template_description(resolutions: tuple[int, ...]) -> dict:
    """template_description.json for the template, with each resolution's grid."""
    grids = {}
    for resolution in resolutions:
        shape, affine = template_grid(resolution)
        grids[f"{resolution:02d}"] = {
            "origin": [float(v) for v in affine[:3, 3]],
            "shape": list(shape),
            "zooms": [float(resolution)] * 3,
        }
    return {
        "Authors": ["Fonov V", "Evans AC", "Botteron K", "Almli CR", "McKinstry RC", "Collins DL"],
        "BIDSVersion": "1.1.0",
        "Identifier": TEMPLATE_NAME,
        "License": "See the ICBM 2009a license (http://nist.mni.mcgill.ca/?p=904)",
        "Name": "ICBM 152 Nonlinear Symmetrical template version 2009a",
        "RRID": "SCR_008796",
        "ReferencesAndLinks": [
            "https://doi.org/10.1016/j.neuroimage.2010.07.033",
            "https://doi.org/10.1016/S1053-8119(09)70884-5",
            "http://nist.mni.mcgill.ca/?p=904",
        ],
        "Species": "Homo sapiens",
        "TemplateFlowVersion": "1.0.0",
        "GeneratedBy": [
            {
                "Name": "dynomp template",
                "Description": "resampled from the skull-stripped MNI152 2009a files that nilearn ships",
            }
        ],
        "res": grids,
    }


def build_template_home(
    home: str | os.PathLike, *, resolutions: tuple[int, ...] = TEMPLATE_RESOLUTIONS
) -> Path:
    """Write tpl-MNI152NLin2009aSym (T1w desc-brain, brain mask, dseg, probseg) into a TemplateFlow home."""
    home = Path(home)
    if home.exists() and not home.is_dir():
        raise ValueError(f"--home: {home} exists and is not a directory")
    if not resolutions:
        raise ValueError("resolutions: need at least one")
    folder = home / f"tpl-{TEMPLATE_NAME}"
    for resolution in resolutions:
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(
                f"resolutions: TemplateFlow resolutions are positive integers, got {resolution}"
            )
        template = template_at_resolution(resolution)
        write_volume(
            folder / template_file_name(resolution=resolution, entities="desc-brain_T1w"),
            template.t1,
            template.affine,
            dtype="float32",
        )
        write_volume(
            folder / template_file_name(resolution=resolution, entities="desc-brain_mask"),
            template.brain_mask,
            template.affine,
            dtype="uint8",
        )
        write_volume(
            folder / template_file_name(resolution=resolution, entities="dseg"),
            template.labels,
            template.affine,
            dtype="uint8",
        )
        for tissue in TISSUES:
            write_volume(
                folder
                / template_file_name(resolution=resolution, entities=f"label-{tissue}_probseg"),
                template.probabilities[tissue],
                template.affine,
                dtype="float32",
            )
    write_text_atomic(folder / f"tpl-{TEMPLATE_NAME}_dseg.tsv", label_table_tsv())
    write_json_atomic(
        folder / "template_description.json", template_description(tuple(resolutions))
    )
    return home


def get_template(
    home: str | os.PathLike, *, template: str = TEMPLATE_NAME, **query
) -> Path | list[Path]:
    """templateflow's `get` on the home `home` (no automatic skeleton update; downloads only what is missing)."""
    if "templateflow" not in sys.modules:
        # templateflow lays out a skeleton in its default home (~/.cache/templateflow) when it is
        # first imported; point that default at this home unless the user chose one
        os.environ.setdefault("TEMPLATEFLOW_HOME", str(Path(home).resolve()))
    from templateflow.client import TemplateFlowClient

    home = Path(home)
    if not home.is_dir():
        raise FileNotFoundError(f"{home}: TemplateFlow home does not exist")
    client = TemplateFlowClient(root=home, autoupdate=False, use_datalad=False)
    found = client.get(template, **query)
    if found == []:
        details = ", ".join(f"{key}={value}" for key, value in query.items())
        raise ValueError(f"{home}: no tpl-{template} file matches {details}")
    return found


def template_files(
    home: str | os.PathLike,
    *,
    template: str = TEMPLATE_NAME,
    resolution: int = 1,
    t1w_desc: str | None = "brain",
) -> dict[str, Path]:
    """The T1w image (desc `t1w_desc`) and brain mask of `template` at `resolution`, through templateflow."""
    t1w = get_template(
        home,
        template=template,
        resolution=resolution,
        suffix="T1w",
        desc=t1w_desc,
        extension=".nii.gz",
    )
    mask = get_template(
        home,
        template=template,
        resolution=resolution,
        suffix="mask",
        desc="brain",
        extension=".nii.gz",
    )
    for kind, found in (("T1w", t1w), ("mask", mask)):
        matches = found if isinstance(found, list) else [found]
        if len(matches) != 1:
            names = ", ".join(path.name for path in matches)
            raise ValueError(
                f"{home}: {len(matches)} tpl-{template} {kind} files match resolution {resolution}: {names}"
            )
    return {"T1w": Path(t1w), "mask": Path(mask)}
