"""Reading a YAML file that a user wrote (configs, sweep files), with errors that name it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | os.PathLike, *, kind: str = "config file") -> Any:
    """The parsed file; FileNotFoundError or a one-line ValueError naming `path` and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        problem = str(error).replace("\n", " ")
        raise ValueError(f"{path}: not valid YAML ({problem})") from None
