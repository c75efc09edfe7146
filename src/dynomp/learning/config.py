"""Training settings as a frozen dataclass; a YAML file overrides defaults, the CLI overrides both.

The defaults are the paper's VoxelMorph setting: Adam at lr 1e-4, batch 4, nb_features
[16, 16, 16, 16, 16], MSE + 0.01 * spatial gradient; and for the classification arm the PyTorch
examples' MNIST CNN with Adadelta at lr 1.0 and batch 64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynomp.precision.controller import EXECUTION_MODES
from dynomp.precision.formats import validate_formats, validate_native_formats
from dynomp.yaml_file import read_yaml

TASKS = ("registration", "classification")
IMAGE_LOSSES = ("mse", "ncc")
LAYOUTS = ("auto", "bids", "oasis")
# keys that may change between a run and its resumption (a longer run continues a shorter one)
RESUMABLE_KEYS = ("steps", "checkpoint_every")


NUMBER_FIELDS = (
    "learning_rate", "regularisation_weight", "clip_gradient_norm", "held_out_fraction",
    "initial_loss_scale",
)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines one learning arm; `config_hash` identifies it in checkpoints."""

    task: str = "registration"
    arm: str = "fp32"
    dim: int = 3
    steps: int = 1000
    batch_size: int | None = None
    learning_rate: float | None = None
    nb_features: tuple[int, ...] = (16, 16, 16, 16, 16)
    integration_steps: int = 5
    image_loss: str = "mse"
    ncc_window: int = 9
    regularisation_weight: float = 0.01
    clip_gradient_norm: float | None = 10.0
    checkpoint_every: int = 50
    seed: int = 0
    held_out_fraction: float = 0.2
    slice_index: int | None = None
    layout: str = "auto"
    device: str = "cpu"
    initial_loss_scale: float = 65536.0
    loss_scale_growth_interval: int = 2000
    formats: tuple[str, ...] = ("bf16", "fp16", "fp32")
    window: int = 5
    execution: str = "native"
    native_formats: tuple[str, ...] | None = None
    initial_format: str = "fp32"
    master_weights: bool = True

    def __post_init__(self) -> None:
        from dynomp.learning.strategies import STRATEGIES

        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{name}: must be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}: must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))

        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r} (known: {', '.join(TASKS)})")
        if self.arm not in STRATEGIES:
            raise ValueError(f"arm: unknown arm {self.arm!r} (known: {', '.join(STRATEGIES)})")
        if self.dim not in (2, 3):
            raise ValueError(f"dim: must be 2 or 3, got {self.dim!r}")
        if self.image_loss not in IMAGE_LOSSES:
            raise ValueError(
                f"image_loss: unknown loss {self.image_loss!r} (known: {', '.join(IMAGE_LOSSES)})"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"layout: unknown layout {self.layout!r} (known: {', '.join(LAYOUTS)})"
            )
        if self.execution not in EXECUTION_MODES:
            raise ValueError(
                f"execution: unknown mode {self.execution!r} (known: {', '.join(EXECUTION_MODES)})"
            )
        for name in ("steps", "checkpoint_every", "window", "ncc_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.integration_steps < 0:
            raise ValueError(f"integration_steps: must be >= 0, got {self.integration_steps!r}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(
                f"held_out_fraction: must be in [0, 1), got {self.held_out_fraction!r}"
            )
        if self.clip_gradient_norm is not None and self.clip_gradient_norm <= 0:
            raise ValueError(
                f"clip_gradient_norm: must be > 0 or null, got {self.clip_gradient_norm!r}"
            )
        if not self.nb_features or any(int(n) < 1 for n in self.nb_features):
            raise ValueError(f"nb_features: expected positive integers, got {self.nb_features!r}")
        object.__setattr__(self, "nb_features", tuple(int(n) for n in self.nb_features))
        object.__setattr__(self, "formats", validate_formats(self.formats, argument="formats"))
        if self.native_formats is not None:
            object.__setattr__(
                self,
                "native_formats",
                validate_native_formats(self.native_formats, argument="native_formats"),
            )
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", 4 if self.task == "registration" else 64)
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", 1e-4 if self.task == "registration" else 1.0)
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size: must be an integer >= 1, got {self.batch_size!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate!r}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-ready values."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    def config_hash(self) -> str:
        """A short hash of every setting that changes the computation (not the step count)."""
        identity = {k: v for k, v in self.as_dict().items() if k not in RESUMABLE_KEYS}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainingConfig:
    """Defaults, then the YAML file at `path` (if any), then `overrides` that are not None."""
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    if path is not None:
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values.update(loaded)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{key}: unknown setting")
        if value is not None:
            values[key] = value
    for key in ("nb_features", "formats", "native_formats"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return TrainingConfig(**values)
