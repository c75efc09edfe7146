"""Datasets through DataLad: save a folder as a dataset, clone one and get only the files needed.

The same path serves the embedded cohort (cloned from a local folder) and real data (a URL, e.g.
CoRR's RawDataBIDS/BMB_1 in the DataLad superdataset): `datalad clone`, then `datalad get` on the
T1-weighted images of the requested subjects, with or without session folders.

Archives (.tar, .tar.gz, .tgz, .zip; e.g. neurite-OASIS, which is published as a tar file and not
as a DataLad dataset) become a new DataLad dataset: the archive is added with its URL (`datalad
download-url`; a local path or file:// URL is recorded with `git annex registerurl`, as DataLad's
downloaders know no file:// scheme and git-annex refuses to download one by default), then `datalad
add-archive-content` extracts it, so every extracted file records the archive it came from.

DataLad 1.7 replaces patool's command runner (`patoolib.util.run`) with one that rejects the
keyword arguments patool >= 2 passes (stderr=, interactive=): where 7z is not installed, every
extraction then fails ("WitlessProtocol.__init__() got an unexpected keyword argument 'stderr'").
While an archive is extracted, patool's runner is therefore a plain subprocess call again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

# A fallback identity, set in the dataset's own .git/config only when git has none configured.
FALLBACK_NAME = "dynomp"
FALLBACK_EMAIL = "dynomp@localhost"
# The paper's dataset: CoRR's BMB_1 site in the DataLad superdataset (datasets.datalad.org).
CORR_BMB_1_SOURCE = "///corr/RawDataBIDS/BMB_1"
SUBJECT_PATTERN = re.compile(r"^(sub-)?([A-Za-z0-9]+)$")
# neurite-OASIS (VoxelMorph's data): a 3D and a 2D-only tar file of OASIS_OAS1_*_MR1/ folders.
NEURITE_OASIS_SOURCE = (
    "https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.v1.0.tar"
)
NEURITE_OASIS_2D_SOURCE = (
    "https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.2d.v1.0.tar"
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# The neurite-OASIS layout as dynomp.learning.data reads it (a test keeps the two equal; importing
# the reader here would import torch, seconds for every `dynomp fetch`).
OASIS_PATTERN = "OASIS_OAS1_*_MR1"
OASIS_FILES = {
    3: ("aligned_norm.nii.gz", "aligned_seg35.nii.gz"),
    2: ("slice_norm.nii.gz", "slice_seg24.nii.gz"),
}
LAYOUTS = ("auto", "bids", "oasis")


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
def _quiet_logger(name: str):
    """The logger's INFO lines off for the block; warnings still show."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quiet_datalad():
    """DataLad's INFO lines (procedure banners) off for the block."""
    return _quiet_logger("datalad")


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
    layout: str = "auto",
) -> list[Path]:
    """Clone a dataset and get its T1w images (bids) or subject folders (oasis); or an archive.

    `layout` auto reads OASIS_OAS1_*_MR1/ folders as the oasis layout and anything else as BIDS.
    An archive is fetched whole (see fetch_archive); a dataset is cloned, then only the T1w images
    of the requested subjects (bids) or every OASIS subject folder (oasis) are got.
    """
    import datalad.api as datalad
    from datalad.support.exceptions import IncompleteResultsError

    if layout not in LAYOUTS:
        raise ValueError(f"--layout: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    dest = Path(dest)
    _check_destination(dest)
    if is_archive(source):
        if subjects is not None:
            raise ValueError(f"--subjects: the archive {source} is fetched whole; leave it out")
        if extra_paths:
            raise ValueError(f"--also: the archive {source} is fetched whole; leave it out")
        return fetch_archive(source, dest=dest, layout=layout)
    if layout == "oasis" and subjects is not None:
        raise ValueError("--subjects: picks BIDS subjects; the oasis layout is fetched whole")
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
        if _resolve_layout(dest, layout=layout) == "oasis":
            if subjects is not None:
                raise ValueError(
                    f"--subjects: {source} has the oasis layout, which is fetched whole"
                )
            folders = oasis_subject_folders(dest, origin=source)
            wanted = [folder.relative_to(dest) for folder in folders]
        else:
            wanted = t1w_files(dest, subjects=subjects)
        wanted += [Path(path) for path in extra_paths]
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


def _check_destination(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"--dest: {dest} already exists and is not an empty directory")


def _source_path(source: str) -> str:
    """The path part of a URL (decoded), or the source itself when it is a local path."""
    return unquote(urlsplit(source).path) if "://" in source else source


def is_archive(source: str) -> bool:
    """True when the source (URL or local path) names a .tar, .tar.gz, .tgz or .zip file."""
    return _source_path(source).lower().endswith(ARCHIVE_SUFFIXES)


def archive_url(source: str) -> str:
    """The URL to fetch an archive from: a local path becomes a file:// URL; it must exist."""
    if "://" in source:
        parts = urlsplit(source)
        if parts.scheme != "file":
            return source
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"--source: {source} is a file:// URL on another host")
        path = Path(url2pathname(parts.path))
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--source: {source}: no such archive file")
    return path.resolve().as_uri()


def fetch_archive(source: str, *, dest: str | os.PathLike, layout: str = "auto") -> list[Path]:
    """Make dest a DataLad dataset of the archive's content; return subject folders or T1w files.

    The archive is added with its URL, then extracted by `datalad add-archive-content` into the
    dataset root (one single top-level folder is stripped) and removed from the work tree; its
    content stays in the annex, where the extracted files point to it. Anything failing leaves
    nothing at dest.
    """
    import datalad.api as datalad
    from datalad.support.exceptions import CommandError, IncompleteResultsError
    from patoolib.util import PatoolError

    if layout not in LAYOUTS:
        raise ValueError(f"--layout: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    dest = Path(dest)
    _check_destination(dest)
    url = archive_url(source)
    archive = dest / PurePosixPath(_source_path(url)).name
    ensure_git_annex_on_path()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        save_as_dataset(dest, message=f"Dataset of the archive {url}")
        try:
            _add_archive_file(url, archive=archive)
        except IncompleteResultsError as error:
            raise ValueError(
                f"--source: cannot download {source} ({_first_message(error)})"
            ) from None
        _check_archive_readable(archive, source=source)
        try:
            with _quiet_datalad(), _patool_subprocess_runner():
                datalad.add_archive_content(
                    str(archive),
                    dataset=str(dest),
                    strip_leading_dirs=True,
                    leading_dirs_depth=1,
                    delete=True,
                    result_renderer="disabled",
                )
        except IncompleteResultsError as error:
            raise ValueError(
                f"--source: cannot extract {source} ({_first_message(error)})"
            ) from None
        except (CommandError, PatoolError, OSError) as error:  # the tools' own: 7z's, patool's
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"--source: cannot extract {source} ({first_line})") from None
        if _resolve_layout(dest, layout=layout) == "oasis":
            return oasis_subject_folders(dest, origin=source)
        if not any(path.is_dir() for path in dest.glob("sub-*")):
            raise ValueError(
                f"--source: {source} holds neither {OASIS_PATTERN}/ folders nor BIDS sub-*/ folders"
            )
        return [dest / path for path in t1w_files(dest)]
    except BaseException:
        # a half-built dataset is not a result: leave nothing behind
        remove_tree(dest)
        raise


def _add_archive_file(url: str, *, archive: Path) -> None:
    """Add the archive at url to the dataset holding `archive`, its URL recorded in git-annex."""
    import datalad.api as datalad

    dataset = archive.parent
    if not url.startswith("file:"):
        with _quiet_datalad():
            datalad.download_url(
                url,
                dataset=str(dataset),
                path=str(archive),
                message=f"Download the archive {archive.name}\n\nURL: {url}",
                result_renderer="disabled",
            )
        return
    shutil.copyfile(url2pathname(urlsplit(url).path), archive)
    with _quiet_datalad():
        datalad.save(
            dataset=str(dataset),
            path=[str(archive)],
            message=f"Add the archive {archive.name}\n\nURL: {url}",
            result_renderer="disabled",
        )
    repository = datalad.Dataset(str(dataset)).repo
    key = repository.get_file_annexinfo(archive.name)["key"]
    # registerurl records the URL without downloading (addurl would refuse the file:// scheme)
    repository.call_annex(["registerurl", key, url])


def _check_archive_readable(archive: Path, *, source: str) -> None:
    """ValueError naming the source unless the archive opens as a zip or a (compressed) tar file."""
    if archive.name.lower().endswith(".zip"):
        readable, kind = zipfile.is_zipfile(archive), "zip"
    else:
        readable, kind = tarfile.is_tarfile(archive), "tar"
    if not readable:
        raise ValueError(f"--source: {source} is not a readable {kind} archive")


def _run_archive_command(
    command: Sequence[str], verbosity: int = 0, interactive: bool = True, **options
) -> int:
    """patoolib.util.run's contract: run the command, return its exit status; output kept quiet."""
    if not interactive:
        options["input"] = ""
    if options.pop("shell", False):
        command, options["shell"] = " ".join(command), True
    # stdout is the file listing of tar -v: it must not reach the listing `dynomp fetch` prints
    options["stdout"] = subprocess.DEVNULL
    options.setdefault("stderr", subprocess.PIPE)
    result = subprocess.run(command, check=False, **options)
    if result.returncode != 0 and result.stderr:
        logging.getLogger(__name__).debug("%s: %s", command, result.stderr)
    return result.returncode


@contextlib.contextmanager
def _patool_subprocess_runner():
    """patool runs its commands with _run_archive_command in the block (see module docstring)."""
    import datalad.support.archives  # noqa: F401  (picks 7z or patool, and patches patool)

    if "datalad.support.archive_utils_patool" not in sys.modules:
        yield  # DataLad extracts with 7z: patool is not involved
        return
    import patoolib.util

    previous = patoolib.util.run
    patoolib.util.run = _run_archive_command
    try:
        # patool logs each step at INFO on stderr, around the listing `dynomp fetch` prints
        with _quiet_logger("patool"):
            yield
    finally:
        patoolib.util.run = previous


def _resolve_layout(dataset: Path, *, layout: str) -> str:
    """The layout asked for, or for auto: oasis when OASIS subject folders are there, else bids."""
    if layout != "auto":
        return layout
    return "oasis" if any(path.is_dir() for path in dataset.glob(OASIS_PATTERN)) else "bids"


def oasis_subject_folders(dataset: str | os.PathLike, *, origin: str) -> list[Path]:
    """The OASIS_OAS1_*_MR1 folders of a dataset; ValueError (naming origin) unless 2+ complete."""
    root = Path(dataset)
    folders = sorted(path for path in root.glob(OASIS_PATTERN) if path.is_dir())
    if len(folders) < 2:
        raise ValueError(
            f"--source: {origin} holds {len(folders)} {OASIS_PATTERN} folder(s); "
            "registration needs at least 2"
        )
    for folder in folders:
        # annexed files not yet got are symlinks without content: lexists, not exists
        if not any(
            all(os.path.lexists(folder / name) for name in names) for names in OASIS_FILES.values()
        ):
            pairs = " nor ".join(" + ".join(names) for names in OASIS_FILES.values())
            raise ValueError(f"{folder}: holds neither {pairs} (from {origin})")
    return folders


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
