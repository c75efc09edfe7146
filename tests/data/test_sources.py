"""DataLad: save a folder as a dataset, clone it and get only the files asked for; archives."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import patoolib.util
import pytest

from dynomp.cli import main
from dynomp.data.nifti import read_volume
from dynomp.data.sources import (
    OASIS_FILES,
    OASIS_PATTERN,
    archive_url,
    ensure_git_annex_on_path,
    fetch,
    is_archive,
    normalize_subjects,
    oasis_subject_folders,
    save_as_dataset,
    t1w_files,
)
from dynomp.learning import data as learning_data


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


# ---------------------------------------------------------------------------------------------
# Archives (neurite-OASIS is a tar file of OASIS_OAS1_*_MR1/ folders)

OASIS_SUBJECTS = ("OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0004_MR1")
OASIS_README = "neurite-oasis: 3 test subjects\n"


def write_oasis_subjects(root: Path, subjects=OASIS_SUBJECTS) -> dict[str, np.ndarray]:
    """neurite-OASIS-style folders (8^3 volumes, 8x8x1 slices) under root; arrays by file."""
    rng = np.random.default_rng(7)
    arrays = {}
    for subject in subjects:
        folder = root / subject
        folder.mkdir(parents=True)
        content = {
            "aligned_norm.nii.gz": rng.random((8, 8, 8), dtype=np.float32),
            "aligned_seg35.nii.gz": rng.integers(0, 35, size=(8, 8, 8)).astype(np.int16),
            "slice_norm.nii.gz": rng.random((8, 8, 1), dtype=np.float32),
            "slice_seg24.nii.gz": rng.integers(0, 24, size=(8, 8, 1)).astype(np.int16),
        }
        for name, array in content.items():
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(folder / name))
            arrays[f"{subject}/{name}"] = array
    (root / "readme.md").write_text(OASIS_README)
    return arrays


def write_archive(folder: Path, archive: Path, *, top_level: str | None = None) -> Path:
    """Pack folder's content into archive (.tar, .tar.gz, .tgz, .zip), under top_level/ if given."""
    prefix = Path(top_level) if top_level else Path()
    members = sorted(folder.rglob("*"))
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as packed:
            for member in members:
                packed.write(member, str(prefix / member.relative_to(folder)))
    else:
        mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(archive, mode) as packed:
            for member in members:
                packed.add(member, str(prefix / member.relative_to(folder)), recursive=False)
    return archive


@pytest.fixture(scope="module")
def oasis_folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Three OASIS subject folders and a readme, and the arrays written."""
    folder = tmp_path_factory.mktemp("oasis") / "neurite-oasis"
    return folder, write_oasis_subjects(folder)


def assert_oasis_dataset(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    """dest: a clean DataLad dataset of exactly the arrays written, read by the learning reader."""
    assert (dest / ".datalad" / "config").is_file()
    status = subprocess.run(
        ["datalad", "status", "--annex", "basic"],
        cwd=dest,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "untracked" not in status.stdout and "modified" not in status.stdout
    assert "12 annex'd files" in status.stdout
    for relative, array in arrays.items():
        stored = np.asanyarray(nib.load(str(dest / relative)).dataobj)
        assert stored.dtype == array.dtype
        assert np.array_equal(stored, array), relative
    assert (dest / "readme.md").read_text() == OASIS_README
    subjects_2d = learning_data.load_subjects(dest, dim=2)
    assert [subject.name for subject in subjects_2d] == list(OASIS_SUBJECTS)
    assert subjects_2d[0].image.shape == (8, 8)
    np.testing.assert_array_equal(
        subjects_2d[1].labels, arrays[f"{OASIS_SUBJECTS[1]}/slice_seg24.nii.gz"][:, :, 0]
    )
    subjects_3d = learning_data.load_subjects(dest, dim=3)
    assert len(subjects_3d) == 3 and subjects_3d[2].image.shape == (8, 8, 8)


def annex_whereis(dataset: Path, *paths: str) -> str:
    """`git annex whereis` of paths (or of every key with --all)."""
    return subprocess.run(
        ["git", "annex", "whereis", *(paths or ("--all",))],
        cwd=dataset,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_oasis_layout_is_the_learning_readers():
    assert OASIS_PATTERN == learning_data.OASIS_PATTERN
    assert OASIS_FILES == learning_data.OASIS_FILES


def test_archive_sources_are_recognised_and_local_paths_become_file_urls(tmp_path):
    assert is_archive("https://example.org/data/neurite-oasis.v1.0.tar")
    assert is_archive("https://example.org/a.TGZ?download=1")
    assert is_archive("/data/a.tar.gz") and is_archive("a.zip")
    assert not is_archive("///corr/RawDataBIDS/BMB_1") and not is_archive("/data/bids")
    archive = tmp_path / "with space.tar"
    archive.write_bytes(b"")
    assert archive_url(str(archive)) == archive.resolve().as_uri()
    assert archive_url(archive.resolve().as_uri()) == archive.resolve().as_uri()
    assert archive_url("https://example.org/a.tar") == "https://example.org/a.tar"
    with pytest.raises(FileNotFoundError, match=r"--source: .*nowhere\.tar: no such archive file"):
        archive_url(str(tmp_path / "nowhere.tar"))
    with pytest.raises(ValueError, match="on another host"):
        archive_url("file://server/share/a.tar")


def test_local_archive_becomes_a_dataset_of_the_oasis_subjects(oasis_folder, tmp_path):
    folder, arrays = oasis_folder
    # one top-level folder, as `tar cf x.tar neurite-oasis/` makes: it is stripped
    archive = write_archive(folder, tmp_path / "neurite-oasis.tar", top_level="neurite-oasis")
    dest = tmp_path / "dataset"
    fetched = fetch(str(archive), dest=dest)
    assert fetched == [dest / subject for subject in OASIS_SUBJECTS]
    assert sorted(path.name for path in dest.iterdir()) == sorted(
        [".datalad", ".git", ".gitattributes", "readme.md", *OASIS_SUBJECTS]
    )
    assert_oasis_dataset(dest, arrays)
    if "datalad.support.archive_utils_patool" in sys.modules:  # DataLad's runner is back
        assert patoolib.util.run.__module__ == "datalad.support.archive_utils_patool"
    # provenance: the archive is known by its URL, each extracted file by its path in the archive
    everything = annex_whereis(dest)
    assert f"web: {archive.resolve().as_uri()}" in everything
    image = annex_whereis(dest, f"{OASIS_SUBJECTS[0]}/aligned_norm.nii.gz")
    assert "datalad-archives: dl+archive:" in image
    assert f"#path=neurite-oasis/{OASIS_SUBJECTS[0]}/aligned_norm.nii.gz" in image
    log = subprocess.run(
        ["git", "log", "--format=%s"], cwd=dest, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert log[0] == "[DATALAD] Added content extracted from archive neurite-oasis.tar"
    assert log[1] == "Add the archive neurite-oasis.tar"


@pytest.mark.parametrize(("archive_name", "as_url"), [("oasis.tar.gz", True), ("oasis.zip", False)])
def test_fetch_command_prints_the_subject_folders(
    oasis_folder, tmp_path, capsys, archive_name, as_url
):
    folder, arrays = oasis_folder
    archive = write_archive(folder, tmp_path / archive_name)  # no top-level folder
    source = archive.resolve().as_uri() if as_url else str(archive)
    dest = tmp_path / "dataset"
    assert main(["fetch", "--source", source, "--dest", str(dest), "--layout", "oasis"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(dest / subject) for subject in OASIS_SUBJECTS]
    assert captured.err == ""
    assert_oasis_dataset(dest, arrays)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output is not an access log
        pass


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A folder served over HTTP on the loopback interface; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_archive_over_http_is_downloaded_with_its_url(oasis_folder, http_folder, tmp_path, capsys):
    folder, arrays = oasis_folder
    served, base = http_folder
    write_archive(folder, served / "neurite-oasis.v1.0.tar")
    dest = tmp_path / "dataset"
    fetched = fetch(f"{base}/neurite-oasis.v1.0.tar", dest=dest)
    assert fetched == [dest / subject for subject in OASIS_SUBJECTS]
    assert_oasis_dataset(dest, arrays)
    assert f"web: {base}/neurite-oasis.v1.0.tar" in annex_whereis(dest)

    missing = tmp_path / "missing"
    assert main(["fetch", "--source", f"{base}/absent.tar", "--dest", str(missing)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"dynomp fetch: error: --source: cannot download {base}/absent.tar (")
    assert error.count("\n") == 1
    assert not missing.exists()


def test_bids_archive_gives_its_t1w_images(tmp_path):
    bids = write_session_dataset(tmp_path / "bids")
    archive = write_archive(bids, tmp_path / "bids.tgz", top_level="bids")
    dest = tmp_path / "dataset"
    fetched = fetch(str(archive), dest=dest)
    assert [path.relative_to(dest) for path in fetched] == t1w_files(bids)
    for path in fetched:
        original = nib.load(str(bids / path.relative_to(dest))).get_fdata()
        assert np.array_equal(nib.load(str(path)).get_fdata(), original)
    assert (dest / "dataset_description.json").read_text() == (
        bids / "dataset_description.json"
    ).read_text()


def test_missing_and_corrupt_archives_are_one_line_errors_and_leave_no_dest(
    oasis_folder, tmp_path, capsys
):
    dest = tmp_path / "dataset"

    def fails(source, *extra):
        assert main(["fetch", "--source", source, "--dest", str(dest), *extra]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1
        assert not dest.exists()
        return error.strip()

    missing = tmp_path / "neurite-oasis.v1.0.tar"
    with pytest.raises(FileNotFoundError, match=f"--source: {missing}: no such archive file"):
        fetch(str(missing), dest=dest)
    assert not dest.exists()
    assert fails(missing.as_uri()) == (
        f"dynomp fetch: error: --source: {missing.as_uri()}: no such archive file"
    )

    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert fails(str(corrupt)) == (
        f"dynomp fetch: error: --source: {corrupt} is not a readable tar archive"
    )
    corrupt_zip = tmp_path / "corrupt.zip"
    corrupt_zip.write_bytes(corrupt.read_bytes())
    assert fails(str(corrupt_zip)) == (
        f"dynomp fetch: error: --source: {corrupt_zip} is not a readable zip archive"
    )

    # a readable header but cut in the middle of the first image: the extraction itself fails
    folder, _ = oasis_folder
    whole = write_archive(folder, tmp_path / "whole.tar")
    with tarfile.open(whole) as packed:
        first_file = next(member for member in packed.getmembers() if member.isfile())
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole.read_bytes()[: first_file.offset_data + first_file.size // 2])
    assert fails(str(truncated)).startswith(
        f"dynomp fetch: error: --source: cannot extract {truncated} ("
    )

    assert fails(str(whole), "--subjects", "01") == (
        f"dynomp fetch: error: --subjects: the archive {whole} is fetched whole; leave it out"
    )


def test_archive_without_two_subjects_of_a_known_layout_is_an_error(tmp_path, capsys):
    dest = tmp_path / "dataset"
    one = tmp_path / "one"
    write_oasis_subjects(one, subjects=OASIS_SUBJECTS[:1])
    archive = write_archive(one, tmp_path / "one.tar")
    with pytest.raises(
        ValueError, match=rf"--source: {archive} holds 1 OASIS_OAS1_\*_MR1 folder\(s\)"
    ):
        fetch(str(archive), dest=dest)
    assert not dest.exists()

    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "images" / "notes.txt").write_text("no subjects\n")
    (other / "readme.md").write_text("x\n")
    archive = write_archive(other, tmp_path / "other.zip")
    assert main(["fetch", "--source", str(archive), "--dest", str(dest)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dynomp fetch: error: --source: {archive} holds neither OASIS_OAS1_*_MR1/ folders "
        "nor BIDS sub-*/ folders"
    )
    assert not dest.exists()


def test_cloned_dataset_with_oasis_folders_gets_every_subject_folder(oasis_folder, tmp_path):
    folder, arrays = oasis_folder
    source = tmp_path / "source"
    shutil.copytree(folder, source)
    save_as_dataset(source, message="neurite-oasis")
    dest = tmp_path / "clone"
    fetched = fetch(str(source), dest=dest)
    assert fetched == [dest / subject for subject in OASIS_SUBJECTS]
    assert_oasis_dataset(dest, arrays)
    assert oasis_subject_folders(dest, origin=str(source)) == fetched

    with pytest.raises(ValueError, match="--subjects: picks BIDS subjects"):
        fetch(str(source), dest=tmp_path / "clone2", subjects=["01"], layout="oasis")
    with pytest.raises(ValueError, match="which is fetched whole"):
        fetch(str(source), dest=tmp_path / "clone3", subjects=["01"])
    assert not (tmp_path / "clone3").exists()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folder, incomplete)
    (incomplete / OASIS_SUBJECTS[1] / "slice_seg24.nii.gz").unlink()
    (incomplete / OASIS_SUBJECTS[1] / "aligned_seg35.nii.gz").unlink()
    with pytest.raises(ValueError, match=rf"{OASIS_SUBJECTS[1]}: holds neither aligned_norm"):
        oasis_subject_folders(incomplete, origin="x")
