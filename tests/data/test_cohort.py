"""The embedded cohort: layout, label maps, head shells, true transforms, seeds, DataLad and bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from scipy import ndimage

from dynomp.cli import main
from dynomp.data.cohort import (
    CohortSettings,
    Grid,
    build_cohort,
    integrate_velocity,
    load_true_transform,
    subject_id,
)
from dynomp.data.nifti import check_same_grid, read_volume
from dynomp.data.templates import LABEL_NAMES, template_at_resolution
from dynomp.evaluate.jacobian import jacobian_determinant
from dynomp.evaluate.overlap import dice, mean_over_labels
from dynomp.evaluate.similarity import normalized_cross_correlation

from .conftest import COHORT_RESOLUTION, COHORT_SEED

SPACE = "MNI152NLin2009aSym"


def subject_files(root, label):
    truth = root / "derivatives" / "truth" / f"sub-{label}"
    xfm = truth / "xfm" / f"sub-{label}_from-{SPACE}_to-T1w_mode-image_xfm"
    return {
        "t1w": root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz",
        "mask": truth / "anat" / f"sub-{label}_desc-brain_mask.nii.gz",
        "dseg": truth / "anat" / f"sub-{label}_dseg.nii.gz",
        "aligned_t1w": truth / "anat" / f"sub-{label}_space-{SPACE}_desc-preproc_T1w.nii.gz",
        "aligned_dseg": truth / "anat" / f"sub-{label}_space-{SPACE}_dseg.nii.gz",
        "xfm": xfm.with_suffix(".nii.gz"),
        "xfm_json": xfm.with_suffix(".json"),
        "xfm_txt": xfm.with_suffix(".txt"),
    }


def test_layout_is_bids_with_a_truth_derivative(cohort):
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    truth = json.loads((cohort / "derivatives" / "truth" / "dataset_description.json").read_text())
    assert truth["DatasetType"] == "derivative"
    rows = (cohort / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t")[0] == "participant_id"
    assert [row.split("\t")[0] for row in rows[1:]] == ["sub-01", "sub-02"]
    table = (cohort / "derivatives" / "truth" / "dseg.tsv").read_text().splitlines()
    assert table[1:] == [f"{index}\t{name}" for index, name in LABEL_NAMES.items()]
    assert (cohort / "README").read_text().startswith("dynomp embedded cohort")
    for label in ("01", "02"):
        for path in subject_files(cohort, label).values():
            assert path.exists(), path
    assert not (cohort / "sub-03").exists()
    assert subject_id(0) == "01" and subject_id(11) == "12"


def test_labels_and_mask_share_the_image_grid_and_hold_six_labels(cohort):
    files = subject_files(cohort, "01")
    image = read_volume(files["t1w"])
    mask = read_volume(files["mask"], labels=True)
    labels = read_volume(files["dseg"], labels=True)
    check_same_grid(image, mask, first_name="T1w", second_name="mask")
    check_same_grid(image, labels, first_name="T1w", second_name="dseg")
    assert set(np.unique(labels.data)) == {0, 1, 2, 3, 4, 5, 6}
    np.testing.assert_array_equal(mask.data, labels.data > 0)
    assert image.spacing == (COHORT_RESOLUTION,) * 3
    # left labels (odd) lie mostly at negative world x, right labels (even) at positive x
    x_world = image.affine[0, 0] * np.arange(image.shape[0]) + image.affine[0, 3]
    x_of = np.broadcast_to(x_world[:, None, None], image.shape)
    assert (
        np.median(x_of[labels.data % 2 == 1])
        < -20
        < 20
        < np.median(x_of[(labels.data % 2 == 0) & (labels.data > 0)])
    )
    # the brain is about 1.9 litres, like the template's
    assert 1.5e6 < mask.data.sum() * COHORT_RESOLUTION**3 < 2.4e6


def test_t1w_has_tissue_contrast_head_shells_and_fits_in_the_field_of_view(cohort):
    files = subject_files(cohort, "02")
    image = read_volume(files["t1w"]).data / 1000.0
    labels = read_volume(files["dseg"], labels=True).data
    means = {
        tissue: image[np.isin(labels, codes)].mean()
        for tissue, codes in {"CSF": (1, 2), "GM": (3, 4), "WM": (5, 6)}.items()
    }
    assert means["CSF"] < means["GM"] < means["WM"]
    brain = labels > 0
    outside = ~brain

    # beyond the brain: a dark skull band, then a bright scalp band, then air
    def ring(inner, outer):
        return ndimage.binary_dilation(brain, iterations=outer) & ~ndimage.binary_dilation(
            brain, iterations=inner
        )

    skull_band, scalp_band = ring(1, 2), ring(3, 4)
    assert image[skull_band].mean() < 0.5 * means["GM"]
    assert image[scalp_band].mean() > image[skull_band].mean() + 0.15
    assert (image[outside] > 0.6).sum() > 0.05 * brain.sum()  # a scalp, not just a brain
    faces = np.concatenate(
        [
            image[0].ravel(),
            image[-1].ravel(),
            image[:, 0].ravel(),
            image[:, -1].ravel(),
            image[:, :, 0].ravel(),
            image[:, :, -1].ravel(),
        ]
    )
    assert faces.mean() < 0.06  # noise only: the head fits


def test_true_transform_reproduces_the_subject_labels(cohort):
    template = template_at_resolution(COHORT_RESOLUTION)
    template_grid = Grid(shape=template.labels.shape, affine=template.affine)
    for label in ("01", "02"):
        labels = read_volume(subject_files(cohort, label)["dseg"], labels=True)
        transform = load_true_transform(cohort, f"sub-{label}")
        points = Grid(shape=labels.shape, affine=labels.affine).world_points()
        resampled = ndimage.map_coordinates(
            np.asarray(template.labels),
            template_grid.voxel_coordinates(transform.apply(points)),
            order=0,
        )
        assert (resampled == labels.data).mean() > 0.999
        # without the true transform, the template's labels on the subject's grid agree much less
        identity = ndimage.map_coordinates(
            np.asarray(template.labels), template_grid.voxel_coordinates(points), order=0
        )
        assert mean_over_labels(dice(identity, labels.data)) < 0.8


def test_warp_is_diffeomorphic_and_misalignment_is_bounded(cohort):
    settings = CohortSettings()
    for label in ("01", "02"):
        transform = load_true_transform(cohort, label)
        spacing = float(transform.warp_grid.affine[0, 0])
        displacement = np.moveaxis(transform.displacement_mm, 0, -1)
        determinant = jacobian_determinant(displacement, spacing=[spacing] * 3)
        assert determinant.min() > 0.2 and determinant.max() < 5.0
        largest = np.linalg.norm(displacement, axis=-1).max()
        assert 1.0 < largest < 3 * settings.velocity_mm
        parameters = json.loads(subject_files(cohort, label)["xfm_json"].read_text())
        assert np.abs(parameters["RotationDegrees"]).max() <= settings.rotation_degrees
        assert np.abs(parameters["TranslationMm"]).max() <= settings.translation_mm
        linear = np.asarray(parameters["AffineMatrix"])[:3, :3]
        assert 0.8 < np.linalg.det(linear) < 1.2 and not np.allclose(linear, np.eye(3), atol=1e-3)
        # the ITK text affine is the same matrix in LPS
        text = subject_files(cohort, label)["xfm_txt"].read_text().splitlines()
        assert text[2] == "Transform: AffineTransform_double_3_3"
        values = np.array(text[3].split(":")[1].split(), dtype=float)
        flip = np.diag([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(values[:9].reshape(3, 3), flip @ linear @ flip, atol=1e-12)


def test_aligned_brain_matches_the_template_up_to_the_warp(cohort):
    template = template_at_resolution(COHORT_RESOLUTION)
    files = subject_files(cohort, "01")
    aligned = read_volume(files["aligned_t1w"])
    aligned_labels = read_volume(files["aligned_dseg"], labels=True)
    np.testing.assert_allclose(aligned.affine, template.affine)
    assert aligned.shape == template.t1.shape
    overlap = mean_over_labels(
        dice(np.asarray(template.labels), aligned_labels.data, labels=list(LABEL_NAMES))
    )
    assert 0.6 < overlap < 0.999  # close to the template, but warped
    # exactly the template's labels at phi(z): the true warp without the affine
    transform = load_true_transform(cohort, "01")
    grid = Grid(shape=template.labels.shape, affine=template.affine)
    expected = ndimage.map_coordinates(
        np.asarray(template.labels),
        grid.voxel_coordinates(transform.warp(grid.world_points())),
        order=0,
    )
    assert (expected == aligned_labels.data).mean() > 0.999
    assert (np.asarray(template.labels) != aligned_labels.data).sum() > 100
    brain_overlap = dice(
        np.asarray(template.brain_mask).astype(int), (aligned_labels.data > 0).astype(int)
    )[1]
    assert brain_overlap > 0.9
    assert normalized_cross_correlation(aligned.data, np.asarray(template.t1)) > 0.8
    assert aligned.data.max() <= 1.0 and aligned.data.min() >= 0.0


def test_scaling_and_squaring_integrates_known_flows():
    shape = (12, 12, 12)
    constant = np.stack([np.full(shape, value) for value in (1.5, -0.5, 0.25)])
    np.testing.assert_allclose(integrate_velocity(constant), constant, atol=1e-12)
    rng = np.random.default_rng(0)
    velocity = np.stack(
        [ndimage.gaussian_filter(rng.normal(size=(24, 24, 24)), 4.0) for _ in range(3)]
    )
    velocity *= 1.5 / np.abs(velocity).max()
    forward, backward = integrate_velocity(velocity), integrate_velocity(-velocity)
    grid = np.stack(np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij"))
    # exp(v) o exp(-v) = identity, away from the border where the field is clamped
    composed = backward + np.stack(
        [
            ndimage.map_coordinates(component, grid + backward, order=1, mode="nearest")
            for component in forward
        ]
    )
    interior = (slice(6, -6),) * 3
    assert np.abs(composed[(slice(None), *interior)]).max() < 0.05
    assert np.abs(forward).max() > 1.0


def test_same_seed_same_subjects_and_subjects_do_not_depend_on_cohort_size(cohort, tmp_path):
    single = build_cohort(
        tmp_path / "one", subjects=1, resolution=COHORT_RESOLUTION, seed=COHORT_SEED, datalad=False
    )
    for kind in ("t1w", "dseg"):
        first = read_volume(subject_files(single, "01")[kind]).data
        np.testing.assert_array_equal(first, read_volume(subject_files(cohort, "01")[kind]).data)
    other = build_cohort(
        tmp_path / "other",
        subjects=1,
        resolution=COHORT_RESOLUTION,
        seed=COHORT_SEED + 1,
        datalad=False,
    )
    assert not np.array_equal(
        read_volume(subject_files(other, "01")["dseg"]).data,
        read_volume(subject_files(single, "01")["dseg"]).data,
    )
    assert not (single / ".git").exists()


def test_cohort_is_a_saved_datalad_dataset_with_images_in_the_annex(cohort):
    import datalad.api as datalad

    dataset = datalad.Dataset(str(cohort))
    assert dataset.is_installed() and dataset.id
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=cohort, capture_output=True, text=True, check=True
    )
    assert status.stdout == ""
    image = subject_files(cohort, "01")["t1w"]
    assert image.is_symlink() and ".git/annex/objects" in str(image.readlink())
    assert not (cohort / "participants.tsv").is_symlink()  # text stays in git
    log = subprocess.run(
        ["git", "log", "--format=%s"], cwd=cohort, capture_output=True, text=True, check=True
    )
    assert "Embedded cohort: 2 subjects at 4 mm, seed 3" in log.stdout
    assert not list(cohort.parent.glob(".bids.*"))  # the building folder was renamed, not copied


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--subjects", "0"], "--subjects: need an integer from 1 to 99, got 0"),
        (["--resolution", "20"], "--resolution: must be between 0.5 and 8 mm, got 20.0"),
        (["--seed", "-1"], "--seed: need a non-negative integer, got -1"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert main(["cohort", "--out", str(tmp_path / "c"), *arguments]) == 2
    assert capsys.readouterr().err.strip() == f"dynomp cohort: error: {message}"
    assert not (tmp_path / "c").exists()


def test_existing_output_is_refused(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    assert main(["cohort", "--out", str(tmp_path / "c")]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    import dynomp.data.cohort as cohort_module

    written = []

    def write_then_fail(path, *args, **kwargs):
        # the disk fills up on the second subject
        if "sub-02" in str(path):
            raise OSError(28, "No space left on device")
        written.append(path)
        return real_write(path, *args, **kwargs)

    real_write = cohort_module.write_volume
    monkeypatch.setattr(cohort_module, "write_volume", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        build_cohort(tmp_path / "c", subjects=2, resolution=COHORT_RESOLUTION, datalad=False)
    assert len(written) == 5  # sub-01 was complete
    assert list(tmp_path.iterdir()) == []


def test_settings_are_checked():
    with pytest.raises(ValueError, match="noise_fraction: must be >= 0, got -1.0"):
        CohortSettings(noise_fraction=-1.0)
    with pytest.raises(ValueError, match="velocity_smoothing_mm: must be > 0"):
        CohortSettings(velocity_smoothing_mm=0.0)


def test_cohort_command_prints_the_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["cohort", "--out", str(out), "--subjects", "1", "--resolution", "6", "--no-datalad"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert read_volume(subject_files(out, "01")["t1w"]).spacing == (6.0, 6.0, 6.0)
