"""containers/*.def: each Apptainer definition parses, names its base image and installs dynomp.

Apptainer itself cannot be installed or run here; these files are parsed with spython (Singularity
Python's recipe parser), and the images are built and tested (`%test`) on a machine with Apptainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from spython.main.parse.parsers import SingularityParser

from tests.workflow.conftest import REPOSITORY

DEFINITIONS = sorted((REPOSITORY / "containers").glob("*.def"))


def recipe(path: Path):
    """The parsed recipe of one definition file."""
    parsed = SingularityParser(str(path)).recipe
    assert list(parsed) == ["spython-base"], f"{path.name}: expected one stage"
    return parsed["spython-base"]


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert [path.name for path in DEFINITIONS] == ["dynomp-cpu.def", "dynomp-cuda.def"]


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda path: path.name)
def test_each_definition_parses_names_its_base_and_installs_the_package(path: Path) -> None:
    text = path.read_text()
    assert "Bootstrap: docker" in text
    parsed = recipe(path)
    assert parsed.fromHeader == "python:3.11-slim-bookworm"
    copied = {line.split()[0]: line.split()[1] for line in parsed.files}
    assert copied["src"] == "/opt/dynomp/src"
    assert copied["pyproject.toml"] == "/opt/dynomp/pyproject.toml"
    assert copied["constraints.txt"] == "/opt/dynomp/constraints.txt"
    for source in copied:
        assert (REPOSITORY / source).exists(), f"{path.name}: %files names missing {source}"
    commands = "\n".join(parsed.install)
    assert "pip install --no-cache-dir -c /opt/dynomp/constraints.txt /opt/dynomp" in commands
    assert parsed.cmd == 'exec dynomp "$@"'  # %runscript
    assert "dynomp --version" in text.split("%test", 1)[1]
    # the C sampler is compiled on the node at first use: the image carries a compiler for it
    tests = text.split("%test", 1)[1]
    assert "gcc libc6-dev" in commands and "native_kernels()" in tests and "filter_kernels()" in tests
    assert "native_statistics()" in tests


def test_the_torch_builds_match_the_images() -> None:
    cpu = "\n".join(recipe(REPOSITORY / "containers" / "dynomp-cpu.def").install)
    cuda = "\n".join(recipe(REPOSITORY / "containers" / "dynomp-cuda.def").install)
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in cpu
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in cuda
    test_section = (REPOSITORY / "containers" / "dynomp-cuda.def").read_text().split("%test", 1)[1]
    assert "import torch, voxelmorph, neurite" in test_section


def test_the_rules_name_the_images_the_definitions_build() -> None:
    schema = (REPOSITORY / "workflow" / "schemas" / "config.schema.yaml").read_text()
    for path in DEFINITIONS:
        assert f"containers/{path.stem}.sif" in schema
        assert f"apptainer build containers/{path.stem}.sif containers/{path.name}" in path.read_text()
