"""Datasets through DataLad: save a folder as a dataset, clone one and get only the T1w files needed.

The same path serves the embedded cohort (cloned from a local folder) and real data (a URL, e.g.
CoRR's RawDataBIDS/BMB_1 in the DataLad superdataset): `datalad clone`, then `datalad get` on the
T1-weighted images of the requested subjects, with or without session folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# A fallback identity, set in the dataset's own .git/config only when git has none configured.
FALLBACK_NAME = "dynomp"
FALLBACK_EMAIL = "dynomp@localhost"
# The paper's dataset: CoRR's BMB_1 site in the DataLad superdataset (datasets.datalad.org).
CORR_BMB_1_SOURCE = "///corr/RawDataBIDS/BMB_1"
SUBJECT_PATTERN = re.compile(r"^(sub-)?([A-Za-z0-9]+)$")


def ensure_git_annex_on_path() -> None:
    """Put the interpreter's bin/ (where the git-annex wheel installs its binary) on PATH if needed."""
    found = shutil.which("git-annex")
    if found is not None and os.path.isabs(found):
        return  # a relative PATH entry would not resolve in a subprocess with another cwd
    interpreter_bin = str(Path(sys.executable).parent)
    if shutil.which("git-annex", path=interpreter_bin) is None:
        raise FileNotFoundError(
            "git-annex: not found on PATH nor beside the Python interpreter "
            "(install the git-annex package)"
        )
    os.environ["PATH"] = interpreter_bin + os.pathsep + os.environ.get("PATH", "")


def _git_identity_configured(folder: Path) -> bool:
    def value(key: str) -> str:
        result = subprocess.run(
            ["git", "config", key], cwd=folder, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    return bool(value("user.name")) and bool(value("user.email"))


def ensure_git_identity(folder: Path) -> None:
    """Set a local user.name/user.email in the repository at `folder` when git has none configured."""
    if not _git_identity_configured(folder):
        for key, setting in (("user.name", FALLBACK_NAME), ("user.email", FALLBACK_EMAIL)):
            subprocess.run(
                ["git", "config", "--local", key, setting],
                cwd=folder,
                check=True,
                capture_output=True,
            )


def save_as_dataset(folder: str | os.PathLike, *, message: str) -> Path:
    """Make `folder` (with its files) a DataLad dataset: text in git, images in git-annex; save it."""
    import datalad.api as datalad

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory to save as a dataset")
    ensure_git_annex_on_path()
    if not (folder / ".git").exists():
        # git init first, so the identity is in place before DataLad's first commit
        subprocess.run(["git", "init", "--quiet", str(folder)], check=True, capture_output=True)
    ensure_git_identity(folder)
    with _quiet_datalad():
        if not (folder / ".datalad").exists():
            datalad.create(
                path=str(folder), force=True, cfg_proc="text2git", result_renderer="disabled"
            )
        datalad.save(dataset=str(folder), message=message, result_renderer="disabled")
    return folder


@contextlib.contextmanager
def _quiet_datalad():
    """DataLad's INFO lines (procedure banners) off for the block; warnings still show."""
    logger = logging.getLogger("datalad")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def normalize_subjects(subjects: Sequence[str] | None) -> list[str] | None:
    """Subject labels without the 'sub-' prefix; ValueError naming a malformed one."""
    if subjects is None:
        return None
    labels = []
    for subject in subjects:
        match = SUBJECT_PATTERN.match(str(subject))
        if match is None:
            raise ValueError(
                f"--subjects: {subject!r} is not a BIDS subject label (letters and digits)"
            )
        labels.append(match.group(2))
    return sorted(set(labels))


def t1w_files(dataset: str | os.PathLike, *, subjects: Sequence[str] | None = None) -> list[Path]:
    """The T1w images (sub-*/anat or sub-*/ses-*/anat) of the requested subjects, relative to the dataset."""
    root = Path(dataset)
    labels = normalize_subjects(subjects)
    found: list[Path] = []
    folders = (
        sorted(root.glob("sub-*"))
        if labels is None
        else [root / f"sub-{label}" for label in labels]
    )
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"--subjects: {folder.name} is not in the dataset {root}")
        images = sorted(folder.glob("anat/*_T1w.nii*")) + sorted(
            folder.glob("ses-*/anat/*_T1w.nii*")
        )
        if not images:
            raise ValueError(f"{folder}: no T1w image (looked in anat/ and ses-*/anat/)")
        found.extend(path.relative_to(root) for path in images)
    if not found:
        raise ValueError(f"{root}: no sub-* folder with a T1w image")
    return found


def fetch(
    source: str,
    *,
    dest: str | os.PathLike,
    subjects: Sequence[str] | None = None,
    extra_paths: Sequence[str] = (),
) -> list[Path]:
    """`datalad clone` source into dest, then `datalad get` only the T1w images (and extra_paths) needed."""
    import datalad.api as datalad
    from datalad.support.exceptions import IncompleteResultsError

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"--dest: {dest} already exists and is not an empty directory")
    source_path = Path(source)
    is_url = "://" in source or source.startswith(("git@", "///"))
    if not is_url and not source_path.is_dir():
        raise FileNotFoundError(f"--source: {source} is neither a URL nor an existing directory")
    ensure_git_annex_on_path()
    try:
        with _quiet_datalad():
            datalad.clone(
                source=str(source_path.resolve()) if not is_url else source,
                path=str(dest),
                result_renderer="disabled",
            )
    except IncompleteResultsError as error:
        raise ValueError(f"--source: cannot clone {source} ({_first_message(error)})") from None
    try:
        wanted = t1w_files(dest, subjects=subjects) + [Path(path) for path in extra_paths]
        missing = [
            path
            for path in extra_paths
            if not (dest / path).exists() and not (dest / path).is_symlink()
        ]
        if missing:
            raise ValueError(
                f"--also: {', '.join(missing)} not in the dataset cloned from {source}"
            )
        with _quiet_datalad():
            datalad.get(
                path=[str(dest / path) for path in wanted],
                dataset=str(dest),
                result_renderer="disabled",
            )
    except IncompleteResultsError as error:
        remove_tree(dest)
        raise ValueError(
            f"--source: cannot get files from {source} ({_first_message(error)})"
        ) from None
    except BaseException:
        # a clone without the files asked for is not a result: leave nothing behind
        remove_tree(dest)
        raise
    return [dest / path for path in wanted]


def _first_message(error: Exception) -> str:
    failed = getattr(error, "failed", None) or []
    for result in failed:
        message = result.get("message")
        if message:
            text = message if isinstance(message, str) else message[0] % tuple(message[1:])
            return text.splitlines()[0]
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def remove_tree(path: str | os.PathLike) -> None:
    """shutil.rmtree that also removes git-annex's write-protected object folders."""

    def make_writable_and_retry(function, failed_path, _):
        os.chmod(Path(failed_path).parent, 0o755)
        if Path(failed_path).is_dir() and not Path(failed_path).is_symlink():
            os.chmod(failed_path, 0o755)
        function(failed_path)

    if Path(path).exists():
        # onerror became onexc in Python 3.12 (same arguments for this handler)
        keyword = "onexc" if sys.version_info >= (3, 12) else "onerror"
        shutil.rmtree(path, **{keyword: make_writable_and_retry})
