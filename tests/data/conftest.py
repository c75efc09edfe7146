"""A small embedded cohort (2 subjects at 4 mm, a DataLad dataset) and a TemplateFlow home, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynomp.cli import main
from dynomp.data.cohort import build_cohort

COHORT_RESOLUTION = 4.0
COHORT_SEED = 3


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """build_cohort(subjects=2, resolution=4, seed=3), saved as a DataLad dataset."""
    return build_cohort(
        tmp_path_factory.mktemp("cohort") / "bids",
        subjects=2,
        resolution=COHORT_RESOLUTION,
        seed=COHORT_SEED,
    )


@pytest.fixture(scope="session")
def template_home(tmp_path_factory) -> tuple[Path, str]:
    """A TemplateFlow home filled by `dynomp template --home`, and what the command printed."""
    import contextlib
    import io

    home = tmp_path_factory.mktemp("templateflow") / "home"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["template", "--home", str(home)]) == 0
    return home, printed.getvalue()
