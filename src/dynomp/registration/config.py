"""Registration settings as dataclasses, with the paper's antsRegistration command as the default.

The paper ran::

    antsRegistration --dimensionality 3 --float 0 --initial-moving-transform [F,M,1]
      --transform Rigid[0.1]  --metric MI[F,M,1,32,Regular,0.25]
        --convergence [1000x500x250x100,1e-6,10] --shrink-factors 8x4x2x1 --smoothing-sigmas 3x2x1x0vox
      --transform Affine[0.1] --metric MI[F,M,1,32,Regular,0.25]  (same schedule)
      --transform SyN[0.1,3,0] --metric CC[F,M,1,4]
        --convergence [100x70x50x20,1e-6,10] --shrink-factors 8x4x2x1 --smoothing-sigmas 3x2x1x0vox

`paper_config()` is that command; `quick_config()` scales it down (fewer levels and iterations) for
tests and laptops. A YAML file starts from one of them (`preset: paper | quick`) and overrides keys;
an unknown key is a ValueError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynomp.precision.controller import EXECUTION_MODES
from dynomp.precision.formats import validate_formats, validate_native_formats
from dynomp.yaml_file import read_yaml

STAGE_NAMES = ("rigid", "affine", "syn")
METRIC_NAMES = ("mi", "cc", "mse")
PRESETS = ("paper", "quick")


@dataclass(frozen=True)
class StageConfig:
    """One transform stage: its metric, its pyramid and its optimizer settings."""

    name: str
    metric: str = "mi"
    iterations: tuple[int, ...] = (1000, 500, 250, 100)
    shrink_factors: tuple[int, ...] = (8, 4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (3.0, 2.0, 1.0, 0.0)
    learning_rate: float = 0.1
    # rigid and affine: the step length (learning_rate voxels at first) is multiplied by this when
    # a step reverses the one before it (ITK's regular-step relaxation; 1 keeps it constant)
    relaxation: float = 0.5
    metric_bins: int = 32
    sampling_fraction: float = 0.25
    cc_radius: int = 4
    # The engine smooths SyN's update and total fields with Gaussians of these standard deviations
    # (voxels). antsRegistration reads the same numbers in SyN[step, 3, 0] as variances (voxels
    # squared), so at the paper's 3 the engine smooths wider (sigma 3 against 1.73). Smoothing with
    # sigma 1.73 was tried: on the 3 mm benchmark pair it lowered the engine's Dice from 0.802 to
    # 0.777 (ANTs: 0.796), so the engine keeps sigma = 3.
    update_sigma: float = 3.0
    total_sigma: float = 0.0
    convergence_window: int = 10
    convergence_threshold: float = 1e-6

    def __post_init__(self) -> None:
        if self.name not in STAGE_NAMES:
            raise ValueError(f"stage name: unknown stage {self.name!r} (known: {', '.join(STAGE_NAMES)})")
        if self.metric not in METRIC_NAMES:
            raise ValueError(
                f"{self.name}.metric: unknown metric {self.metric!r} (known: {', '.join(METRIC_NAMES)})"
            )
        levels = len(self.iterations)
        if not levels:
            raise ValueError(f"{self.name}.iterations: at least one level is needed")
        if len(self.shrink_factors) != levels or len(self.smoothing_sigmas) != levels:
            raise ValueError(
                f"{self.name}: iterations, shrink_factors and smoothing_sigmas need one value per level "
                f"(got {levels}, {len(self.shrink_factors)}, {len(self.smoothing_sigmas)})"
            )
        if any(int(n) < 0 for n in self.iterations):
            raise ValueError(f"{self.name}.iterations: must be >= 0, got {self.iterations}")
        if any(int(s) < 1 for s in self.shrink_factors):
            raise ValueError(f"{self.name}.shrink_factors: must be >= 1, got {self.shrink_factors}")
        if any(float(s) < 0 for s in self.smoothing_sigmas):
            raise ValueError(f"{self.name}.smoothing_sigmas: must be >= 0, got {self.smoothing_sigmas}")
        if not self.learning_rate > 0:
            raise ValueError(f"{self.name}.learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 < self.relaxation <= 1:
            raise ValueError(f"{self.name}.relaxation: must be in (0, 1], got {self.relaxation}")
        if self.metric_bins < 8:
            raise ValueError(f"{self.name}.metric_bins: must be >= 8, got {self.metric_bins}")
        if not 0 < self.sampling_fraction <= 1:
            raise ValueError(
                f"{self.name}.sampling_fraction: must be in (0, 1], got {self.sampling_fraction}"
            )
        if self.cc_radius < 1:
            raise ValueError(f"{self.name}.cc_radius: must be >= 1, got {self.cc_radius}")
        if self.update_sigma < 0 or self.total_sigma < 0:
            raise ValueError(f"{self.name}: update_sigma and total_sigma must be >= 0")
        if self.convergence_window < 2:
            raise ValueError(
                f"{self.name}.convergence_window: must be >= 2, got {self.convergence_window}"
            )

    @property
    def levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.iterations)


@dataclass(frozen=True)
class PrecisionConfig:
    """The `dynomp` arm's controller: allowed formats, p_min window, execution mode; and which
    formats run natively (`native_formats`; None: the device's, fp64 and fp32 on a CPU, and also
    fp16 and bf16 on CUDA)."""

    formats: tuple[str, ...] = ("bf16", "fp16", "fp32", "fp64")
    window: int = 5
    execution: str = "native"
    initial_format: str = "fp64"
    # formats held in their own torch dtype and computed in by torch where the device would not
    # (bf16 and fp16 on a CPU run the same code a GPU runs, in 16-bit tensors); the others are
    # emulated in float32 containers, as on the device by default
    native_formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", validate_formats(self.formats, argument="precision.formats"))
        if self.native_formats is not None:
            object.__setattr__(self, "native_formats", validate_native_formats(
                self.native_formats, argument="precision.native_formats"))
        validate_formats([self.initial_format], argument="precision.initial_format")
        if self.execution not in EXECUTION_MODES:
            raise ValueError(
                f"precision.execution: unknown mode {self.execution!r} "
                f"(known: {', '.join(EXECUTION_MODES)})"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"precision.window: must be an integer >= 1, got {self.window!r}")


@dataclass(frozen=True)
class RegistrationConfig:
    """The whole pipeline: centre-of-mass initialisation, then the stages in order."""

    stages: tuple[StageConfig, ...]
    initialize_center_of_mass: bool = True
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 1
    threads: int | None = None
    # re-evaluate each level's final state (after its last step) in float64, with float64 images:
    # the quality of where a level ended, apart from the rounding of the loss it saw
    reference_losses: bool = False

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        names = [stage.name for stage in self.stages]
        if "syn" in names and names.index("syn") != len(names) - 1:
            raise ValueError("stages: syn must be the last stage")
        if len(set(names)) != len(names):
            raise ValueError(f"stages: each stage may appear once, got {names}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for metrics.json and YAML)."""
        return dataclasses.asdict(self)


def paper_config() -> RegistrationConfig:
    """The paper's antsRegistration parameters (see the module docstring)."""
    return RegistrationConfig(
        stages=(
            StageConfig(name="rigid", metric="mi"),
            StageConfig(name="affine", metric="mi"),
            StageConfig(name="syn", metric="cc", iterations=(100, 70, 50, 20)),
        )
    )


def quick_config() -> RegistrationConfig:
    """The paper's pipeline scaled down: three levels (4x2x1), few iterations, larger SyN steps."""
    shrink, sigmas = (4, 2, 1), (2.0, 1.0, 0.0)
    return RegistrationConfig(
        stages=(
            StageConfig(name="rigid", iterations=(60, 30, 15), shrink_factors=shrink,
                        smoothing_sigmas=sigmas),
            StageConfig(name="affine", iterations=(60, 30, 15), shrink_factors=shrink,
                        smoothing_sigmas=sigmas),
            StageConfig(name="syn", metric="cc", iterations=(40, 30, 15), shrink_factors=shrink,
                        smoothing_sigmas=sigmas, learning_rate=0.25),
        )
    )


def _tuple_fields(stage: dict[str, Any]) -> dict[str, Any]:
    converted = dict(stage)
    for key in ("iterations", "shrink_factors", "smoothing_sigmas"):
        if key in converted:
            value = converted[key]
            if isinstance(value, str):  # ANTs' own spelling: 1000x500x250x100
                value = value.removesuffix("vox").split("x")
            kind = float if key == "smoothing_sigmas" else int
            converted[key] = tuple(kind(v) for v in value)
    return converted


def _boolean(value: Any, name: str) -> bool:
    """`value` if it is a bool (YAML's true/false), else a ValueError naming the key."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> RegistrationConfig:
    """A RegistrationConfig from plain data: a preset plus overrides; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    known_top = {"preset", "stages", "initialize_center_of_mass", "precision", "seed", "threads",
                 "reference_losses"}
    for key in data:
        if key not in known_top:
            raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known_top))})")
    preset = data.get("preset", "paper")
    if preset not in PRESETS:
        raise ValueError(f"{source}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    base = paper_config() if preset == "paper" else quick_config()
    stage_keys = {f.name for f in dataclasses.fields(StageConfig)}
    stages = base.stages
    if "stages" in data:
        given = data["stages"]
        if not isinstance(given, list) or not given:
            raise ValueError(f"{source}: stages must be a non-empty list")
        defaults = {stage.name: stage for stage in base.stages}
        built = []
        for index, stage in enumerate(given):
            if not isinstance(stage, dict) or "name" not in stage:
                raise ValueError(f"{source}: stages[{index}] must be a mapping with a name")
            for key in stage:
                if key not in stage_keys:
                    raise ValueError(f"{source}: stages[{index}]: unknown key {key!r}")
            start = defaults.get(stage["name"])
            overrides = _tuple_fields(stage)
            try:
                built.append(
                    dataclasses.replace(start, **overrides) if start else StageConfig(**overrides)
                )
            except (TypeError, ValueError) as error:
                raise ValueError(f"{source}: stages[{index}]: {error}") from None
        stages = tuple(built)
    precision = base.precision
    if "precision" in data:
        given = data["precision"]
        precision_keys = {f.name for f in dataclasses.fields(PrecisionConfig)}
        if not isinstance(given, dict):
            raise ValueError(f"{source}: precision must be a mapping")
        for key in given:
            if key not in precision_keys:
                raise ValueError(f"{source}: precision: unknown key {key!r}")
        values = dict(given)
        for key in ("formats", "native_formats"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        try:
            precision = dataclasses.replace(precision, **values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    try:
        return RegistrationConfig(
            stages=stages,
            initialize_center_of_mass=bool(
                data.get("initialize_center_of_mass", base.initialize_center_of_mass)
            ),
            precision=precision,
            seed=int(data.get("seed", base.seed)),
            threads=data.get("threads", base.threads),
            reference_losses=_boolean(data.get("reference_losses", base.reference_losses),
                                      f"{source}: reference_losses"),
        )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def load_config(path: str | Path | None) -> RegistrationConfig:
    """Read a YAML config (None: the paper's defaults; "paper" or "quick": a preset); errors name the file."""
    if path is None:
        return paper_config()
    if str(path) in PRESETS and not Path(path).is_file():
        return paper_config() if str(path) == "paper" else quick_config()
    data = read_yaml(path) or {}
    return config_from_dict(data, source=str(path))
