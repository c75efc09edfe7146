"""The template from nilearn's files, and the TemplateFlow home that templateflow resolves offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dynomp.cli import main
from dynomp.data.nifti import check_same_grid, read_volume
from dynomp.data.templates import (
    LABEL_NAMES,
    _block_average,
    get_template,
    template_at_resolution,
    template_files,
    template_grid,
)

FOLDER = "tpl-MNI152NLin2009aSym"


@pytest.fixture
def network_blocked(monkeypatch):
    """Every socket connection fails, as on a compute node without internet."""

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_grids_follow_templateflow_res_convention():
    shape, affine = template_grid(1)
    assert shape == (197, 233, 189)
    np.testing.assert_allclose(affine[:3, 3], [-98.0, -134.0, -72.0])
    shape, affine = template_grid(2)
    assert shape == (99, 117, 95)
    np.testing.assert_allclose(affine[:3, 3], [-98.5, -134.5, -72.5])
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    # the 2 mm grid keeps the 1 mm grid's centre, as TemplateFlow's res-02 does
    centre_1 = template_grid(1)[1][:3, 3] + (np.array(template_grid(1)[0]) - 1) / 2
    centre_2 = affine[:3, 3] + 2 * (np.array(shape) - 1) / 2
    assert np.abs(centre_1 - centre_2).max() <= 1.0
    with pytest.raises(ValueError, match="--resolution: must be between 0.5 and 8 mm, got 0"):
        template_grid(0)


def test_block_average_is_the_partial_volume_mean():
    volume = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    averaged = _block_average(volume, 2, (3, 3, 3))
    # block (1, 1, 1) covers 1 mm voxels 1..2 on each axis
    assert averaged[1, 1, 1] == pytest.approx(volume[1:3, 1:3, 1:3].mean())
    # block 0 is half padding (the first voxel sits one voxel before the 1 mm grid)
    assert averaged[0, 0, 0] == pytest.approx(volume[0, 0, 0] / 8)


def test_template_labels_tissues_and_symmetry():
    template = template_at_resolution(2)
    assert set(np.unique(template.labels)) == set(range(7))
    np.testing.assert_array_equal(template.labels > 0, template.brain_mask)
    assert template.t1[~template.brain_mask].max() == 0 and template.t1.max() <= 1.0
    total = sum(template.probabilities.values())
    assert total.max() <= 1.0 + 1e-5
    counts = {name: int((template.labels == index).sum()) for index, name in LABEL_NAMES.items()}
    for tissue in ("GM", "WM"):  # a symmetric template: the hemispheres match within 3 %
        assert abs(counts[f"{tissue}-L"] - counts[f"{tissue}-R"]) < 0.03 * counts[f"{tissue}-L"]
    assert counts["GM-L"] > counts["WM-L"] > counts["CSF-L"]
    mean = {
        tissue: template.t1[template.probabilities[tissue] > 0.7].mean()
        for tissue in ("CSF", "GM", "WM")
    }
    assert mean["CSF"] < mean["GM"] < mean["WM"]
    # nilearn's brain mask at 1 mm holds 1.883 litres
    assert template.brain_mask.sum() * 8 == pytest.approx(1.883e6, rel=0.02)


@pytest.mark.slow
def test_home_holds_templateflow_named_files_with_consistent_grids(template_home):
    home, printed = template_home
    folder = home / FOLDER
    description = json.loads((folder / "template_description.json").read_text())
    assert description["Identifier"] == "MNI152NLin2009aSym"
    for index in (1, 2):
        resolution = f"res-{index:02d}"
        grid = description["res"][f"{index:02d}"]
        files = {
            kind: folder / f"{FOLDER}_{resolution}_{kind}.nii.gz"
            for kind in (
                "desc-brain_T1w",
                "desc-brain_mask",
                "dseg",
                "label-CSF_probseg",
                "label-GM_probseg",
                "label-WM_probseg",
            )
        }
        image = read_volume(files["desc-brain_T1w"])
        assert list(image.shape) == grid["shape"] and list(image.spacing) == grid["zooms"]
        np.testing.assert_allclose(image.affine[:3, 3], grid["origin"])
        mask = read_volume(files["desc-brain_mask"], labels=True)
        labels = read_volume(files["dseg"], labels=True)
        for name, volume in (("mask", mask), ("dseg", labels)):
            check_same_grid(image, volume, first_name="T1w", second_name=name)
        np.testing.assert_array_equal(mask.data, labels.data > 0)
        gm = read_volume(files["label-GM_probseg"]).data
        assert 0.0 <= gm.min() and gm.max() <= 1.0 and gm[labels.data == 3].mean() > 0.5
    assert (folder / f"{FOLDER}_dseg.tsv").read_text().splitlines()[1] == "1\tCSF-L"
    assert printed.splitlines() == [
        f"T1w\t{folder}/{FOLDER}_res-01_desc-brain_T1w.nii.gz",
        f"mask\t{folder}/{FOLDER}_res-01_desc-brain_mask.nii.gz",
    ]


@pytest.mark.slow
def test_templateflow_get_resolves_with_the_network_blocked(template_home, network_blocked):
    home, _ = template_home
    files = template_files(home, resolution=2)
    assert files == {
        "T1w": home / FOLDER / f"{FOLDER}_res-02_desc-brain_T1w.nii.gz",
        "mask": home / FOLDER / f"{FOLDER}_res-02_desc-brain_mask.nii.gz",
    }
    probabilities = get_template(home, resolution=1, suffix="probseg")
    assert sorted(path.name for path in probabilities) == [
        f"{FOLDER}_res-01_label-{tissue}_probseg.nii.gz" for tissue in ("CSF", "GM", "WM")
    ]
    with pytest.raises(ValueError, match="no tpl-MNI152NLin2009cAsym file matches"):
        get_template(home, template="MNI152NLin2009cAsym", resolution=1, suffix="T1w")


@pytest.mark.slow
def test_templateflow_api_in_a_fresh_process_needs_no_network(template_home, tmp_path):
    home, _ = template_home
    # a copy of the home with one empty file: templateflow must try to download it, and fail
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(home, broken)
    (broken / FOLDER / f"{FOLDER}_res-02_dseg.nii.gz").write_bytes(b"")
    script = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network blocked by the test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from templateflow import api\n"
        "print(api.get('MNI152NLin2009aSym', resolution=1, desc='brain', suffix='mask'))\n"
        "print(api.get('MNI152NLin2009aSym', resolution=2, desc=None, suffix='dseg', extension='.nii.gz'))\n"
    )
    environment = {**os.environ, "TEMPLATEFLOW_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(home / FOLDER / f"{FOLDER}_res-01_desc-brain_mask.nii.gz"),
        str(home / FOLDER / f"{FOLDER}_res-02_dseg.nii.gz"),
    ]
    environment["TEMPLATEFLOW_HOME"] = str(broken)
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "network blocked by the test" in result.stderr


def test_template_command_rejects_a_file_as_home(tmp_path, capsys):
    home = tmp_path / "file"
    home.write_text("not a folder")
    assert main(["template", "--home", str(home)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dynomp template: error: --home: {home} exists and is not a directory"
    )


def test_template_command_exports_the_brain_and_labels_at_any_resolution(tmp_path, capsys):
    home = tmp_path / "home"
    brain, labels = tmp_path / "brain.nii.gz", tmp_path / "dseg.nii.gz"
    code = main(["template", "--home", str(home), "--resolution", "4", "--brain", str(brain),
                 "--labels", str(labels)])
    assert code == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert printed["brain"] == str(brain) and printed["dseg"] == str(labels)
    assert printed["T1w"].endswith("tpl-MNI152NLin2009aSym_res-04_desc-brain_T1w.nii.gz")
    source = nib.load(printed["T1w"])
    written = nib.load(brain)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert np.allclose(np.asarray(written.dataobj), np.asarray(source.dataobj))
    written_labels = np.asarray(nib.load(labels).dataobj)
    assert written_labels.shape == source.shape and set(np.unique(written_labels)) >= {0, 1, 2, 3}
    # res-01 and res-02 are built as well, as TemplateFlow has them
    assert {p.name.split("_")[1] for p in (home / "tpl-MNI152NLin2009aSym").glob("*_T1w.nii.gz")} \
        == {"res-01", "res-02", "res-04"}


def test_template_command_masks_a_whole_head_template(tmp_path):
    from dynomp.data.commands import export_template_brain

    head = np.arange(27, dtype=float).reshape(3, 3, 3) + 1
    mask = np.zeros((3, 3, 3), dtype=np.uint8)
    mask[1] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    files = {"T1w": tmp_path / "tpl-X_res-01_T1w.nii.gz", "mask": tmp_path / "m.nii.gz"}
    nib.save(nib.Nifti1Image(head, affine), files["T1w"])
    nib.save(nib.Nifti1Image(mask, affine), files["mask"])
    out = export_template_brain(files, out=tmp_path / "brain.nii.gz")
    data = np.asarray(nib.load(out).dataobj)
    assert np.array_equal(data[1], head[1]) and not data[0].any() and not data[2].any()


def test_template_labels_only_for_the_embedded_template(tmp_path, capsys):
    code = main(["template", "--home", str(tmp_path), "--template", "MNI152NLin2009cAsym",
                 "--labels", str(tmp_path / "l.nii.gz")])
    assert code == 2
    assert "--labels: MNI152NLin2009cAsym has no label map here" in capsys.readouterr().err
