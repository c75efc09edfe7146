"""Training settings: the paper's defaults, YAML overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynomp.learning.config import load_config
from dynomp.learning.strategies import Strategy

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "learning"


def test_defaults_are_the_papers() -> None:
    config = load_config(arm="fp32")
    assert (config.batch_size, config.learning_rate, config.nb_features) == (4, 1e-4, (16,) * 5)
    assert config.regularisation_weight == 0.01 and config.image_loss == "mse"
    assert load_config(CONFIGS / "paper.yaml", arm="fp32") == config
    classification = load_config(CONFIGS / "classification.yaml", arm="amp")
    assert (classification.batch_size, classification.learning_rate) == (64, 1.0)
    # the step count may change between a run and its resumption; the seed may not
    assert load_config(arm="fp32", steps=5).config_hash() == config.config_hash()
    assert load_config(arm="fp32", seed=1).config_hash() != config.config_hash()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arm": "fp12"}, "arm: unknown arm 'fp12'"),
        ({"arm": "fp32", "dim": 4}, "dim: must be 2 or 3"),
        ({"arm": "fp32", "image_loss": "mi"}, "image_loss: unknown loss 'mi'"),
        ({"arm": "fp32", "formats": ("fp13",)}, "formats: unknown format 'fp13'"),
        ({"arm": "fp32", "native_formats": ("fp32", "fp8-e4m3")},
         "native_formats: torch does not compute in 'fp8-e4m3'"),
        ({"arm": "fp32", "native_formats": "bf16"}, "native_formats: expected a list of format names, got 'bf16'"),
        ({"arm": "fp32", "steps": 0}, "steps: must be an integer >= 1"),
        ({"arm": "fp32", "held_out_fraction": 1.0}, "held_out_fraction: must be in"),
        ({"arm": "fp32", "batch_size": 0}, "batch_size: must be an integer >= 1"),
        ({"arm": "fp32", "learning_rate": "fast"}, "learning_rate: must be a number, got 'fast'"),
        ({"arm": "fp32", "regularisation_weight": [0.1]}, "regularisation_weight: must be a number"),
    ],
)
def test_bad_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(**overrides)


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml", arm="fp32")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml", arm="fp32")
    (tmp_path / "typo.yaml").write_text("nb_feature: [4]\n")
    with pytest.raises(ValueError, match="typo.yaml: unknown setting\\(s\\) nb_feature"):
        load_config(tmp_path / "typo.yaml", arm="fp32")
    with pytest.raises(ValueError, match="arm: unknown arm 'bf8'"):
        Strategy("bf8", load_config(arm="fp32"))


def test_a_yaml_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; the config takes it as the number
    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-3\nregularisation_weight: 2e-2\n")
    config = load_config(tmp_path / "lr.yaml", arm="fp32")
    assert config.learning_rate == 1e-3 and isinstance(config.learning_rate, float)
    assert config.regularisation_weight == 0.02
