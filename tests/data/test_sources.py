"""DataLad: save a folder as a dataset, clone it from a path and get only the T1w images asked for."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dynomp.cli import main
from dynomp.data.nifti import read_volume
from dynomp.data.sources import (
    ensure_git_annex_on_path,
    fetch,
    normalize_subjects,
    save_as_dataset,
    t1w_files,
)


def write_session_dataset(root: Path) -> Path:
    """A BIDS dataset with sessions (as CoRR BMB_1): two subjects x two sessions, T1w and bold."""
    rng = np.random.default_rng(0)
    for subject in ("A01", "B02"):
        for session in ("1", "2"):
            anat = root / f"sub-{subject}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True)
            data = rng.normal(size=(6, 6, 6)).astype(np.float32)
            nib.save(
                nib.Nifti1Image(data, np.eye(4)),
                str(anat / f"sub-{subject}_ses-{session}_T1w.nii.gz"),
            )
            func = anat.parent / "func"
            func.mkdir()
            nib.save(
                nib.Nifti1Image(data[..., None].repeat(3, axis=3), np.eye(4)),
                str(func / f"sub-{subject}_ses-{session}_task-rest_bold.nii.gz"),
            )
    (root / "dataset_description.json").write_text('{"Name": "sessions", "BIDSVersion": "1.9.0"}\n')
    return root


def annex_present(path: Path) -> bool:
    """True when an annexed file's content is in this clone (its symlink resolves)."""
    return path.exists()


def test_clone_and_get_only_the_requested_t1w_images(cohort, tmp_path):
    dest = tmp_path / "clone"
    fetched = fetch(str(cohort), dest=dest, subjects=["sub-02"])
    assert fetched == [dest / "sub-02" / "anat" / "sub-02_T1w.nii.gz"]
    original = read_volume(cohort / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    np.testing.assert_array_equal(read_volume(fetched[0]).data, original.data)
    assert not annex_present(dest / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert (dest / "sub-01" / "anat" / "sub-01_T1w.nii.gz").is_symlink()  # known, not fetched
    assert not annex_present(
        dest / "derivatives" / "truth" / "sub-02" / "anat" / "sub-02_dseg.nii.gz"
    )
    assert (dest / "participants.tsv").read_text() == (cohort / "participants.tsv").read_text()
    origin = subprocess.run(
        ["git", "config", "remote.origin.url"], cwd=dest, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(origin) == cohort.resolve()


def test_sessions_layout_gets_every_session_of_the_subject_and_no_bold(tmp_path):
    source = save_as_dataset(write_session_dataset(tmp_path / "source"), message="sessions")
    assert t1w_files(source, subjects=["A01"]) == [
        Path("sub-A01/ses-1/anat/sub-A01_ses-1_T1w.nii.gz"),
        Path("sub-A01/ses-2/anat/sub-A01_ses-2_T1w.nii.gz"),
    ]
    assert len(t1w_files(source)) == 4
    dest = tmp_path / "clone"
    fetched = fetch(str(source), dest=dest, subjects=["A01"])
    assert [path.name for path in fetched] == [
        "sub-A01_ses-1_T1w.nii.gz",
        "sub-A01_ses-2_T1w.nii.gz",
    ]
    assert all(annex_present(path) for path in fetched)
    assert not annex_present(
        dest / "sub-A01" / "ses-1" / "func" / "sub-A01_ses-1_task-rest_bold.nii.gz"
    )
    assert not annex_present(dest / "sub-B02" / "ses-1" / "anat" / "sub-B02_ses-1_T1w.nii.gz")


def test_also_gets_further_paths(cohort, tmp_path, capsys):
    dest = tmp_path / "clone"
    assert (
        main(
            [
                "fetch",
                "--source",
                str(cohort),
                "--dest",
                str(dest),
                "--subjects",
                "01",
                "--also",
                "derivatives/truth/sub-01",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        str(dest / "sub-01" / "anat" / "sub-01_T1w.nii.gz"),
        str(dest / "derivatives/truth/sub-01"),
    ]
    labels = read_volume(dest / "derivatives/truth/sub-01/anat/sub-01_dseg.nii.gz", labels=True)
    assert set(np.unique(labels.data)) == set(range(7))
    assert not annex_present(dest / "derivatives/truth/sub-02/anat/sub-02_dseg.nii.gz")


def test_unknown_subject_fails_and_leaves_no_clone(cohort, tmp_path, capsys):
    dest = tmp_path / "clone"
    assert main(["fetch", "--source", str(cohort), "--dest", str(dest), "--subjects", "07"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"dynomp fetch: error: --subjects: sub-07 is not in the dataset {dest}"
    )
    assert not dest.exists()


def test_bad_sources_and_destinations_are_one_line_errors(cohort, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["fetch", "--source", str(missing), "--dest", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dynomp fetch: error: --source: {missing} is neither a URL nor an existing directory"
    )
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    assert main(["fetch", "--source", str(cohort), "--dest", str(occupied)]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["fetch", "--source", str(plain), "--dest", str(tmp_path / "d2")]) == 2
    assert capsys.readouterr().err.startswith("dynomp fetch: error: --source: cannot clone")
    assert not (tmp_path / "d2").exists()
    with pytest.raises(ValueError, match=r"--subjects: '\.\./x' is not a BIDS subject label"):
        normalize_subjects(["../x"])
    assert normalize_subjects(["sub-02", "02", "10"]) == ["02", "10"]


def test_identity_is_set_locally_only_when_git_has_none(tmp_path, monkeypatch):
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key in (
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
        "EMAIL",
    ):
        monkeypatch.delenv(key, raising=False)
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello\n")
    save_as_dataset(folder, message="first save")
    config = subprocess.run(
        ["git", "config", "--local", "user.name"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    assert config.stdout.strip() == "dynomp"
    author = subprocess.run(
        ["git", "log", "-1", "--format=%an <%ae> %s"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    assert author.stdout.strip() == "dynomp <dynomp@localhost> first save"

    # with an identity configured, none is written into the dataset
    configured = tmp_path / "gitconfig"
    configured.write_text("[user]\n\tname = Ada Lovelace\n\temail = ada@example.org\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(configured))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello\n")
    save_as_dataset(other, message="second")
    local = subprocess.run(
        ["git", "config", "--local", "user.name"],
        check=False,
        cwd=other,
        capture_output=True,
        text=True,
    )
    assert local.returncode == 1 and local.stdout == ""
    author = subprocess.run(
        ["git", "log", "-1", "--format=%an"], cwd=other, capture_output=True, text=True, check=True
    )
    assert author.stdout.strip() == "Ada Lovelace"


def test_git_annex_is_found_beside_the_interpreter(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if shutil.which("git-annex") is not None:
        pytest.skip("a system git-annex is on /usr/bin")
    ensure_git_annex_on_path()
    assert shutil.which("git-annex") is not None
    assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(shutil.which("git-annex")).parent)
