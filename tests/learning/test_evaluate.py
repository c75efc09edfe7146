"""`dynomp evaluate-model`: the tidy table on held-out pairs, and its errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dynomp.cli import main
from dynomp.evaluate.overlap import dice
from dynomp.learning.config import load_config
from dynomp.learning.data import load_subjects
from dynomp.learning.evaluate import TABLE_COLUMNS, evaluate_model
from dynomp.learning.train import train


def test_evaluate_model_table(cohort_2d: Path, tmp_path: Path) -> None:
    config = load_config(arm="fp32", dim=2, steps=1, nb_features=(4, 4, 4), held_out_fraction=0.4)
    train(config, data=cohort_2d, out=tmp_path / "run", progress=False)
    assert (
        main(
            [
                "evaluate-model",
                "--run",
                str(tmp_path / "run"),
                "--data",
                str(cohort_2d),
                "--out",
                str(tmp_path / "table.tsv"),
            ]
        )
        == 0
    )
    table = evaluate_model(run=tmp_path / "run", data=cohort_2d, out=tmp_path / "table.parquet")
    assert list(table.columns) == ["arm", "moving", "fixed", "metric", "label", "value"]
    from_tsv = pd.read_csv(tmp_path / "table.tsv", sep="\t", na_values="n/a")
    assert len(from_tsv) == len(table) == 2 * (2 + 4)  # 2 held-out pairs x (2 labels + 4 measures)
    assert set(table.metric) == {
        "dice",
        "jacobian_nonpositive_percent",
        "sd_log_jacobian",
        "inference_seconds",
        "peak_memory_bytes",
    }
    # after one step of a near-zero initialised flow the warp is the identity to well under half a
    # voxel, so Dice is that of the unregistered label maps
    subjects = {s.name: s for s in load_subjects(cohort_2d, dim=2)}
    for (moving, fixed), pair in table[table.metric == "dice"].groupby(["moving", "fixed"]):
        expected = dice(subjects[fixed].labels, subjects[moving].labels, [1, 2])
        assert dict(zip(pair.label, pair.value, strict=True)) == pytest.approx(expected)
    measures = table.set_index("metric").value
    assert (measures["jacobian_nonpositive_percent"] == 0).all()
    assert (measures["sd_log_jacobian"] < 1e-2).all()
    assert (measures["inference_seconds"] > 0).all() and (measures["peak_memory_bytes"] > 0).all()
    with pytest.raises(ValueError, match="unknown table format"):
        evaluate_model(run=tmp_path / "run", data=cohort_2d, out=tmp_path / "table.csv")


def test_evaluate_model_writes_an_empty_table_for_a_diverged_run_and_refuses_a_missing_one(cohort_2d: Path, tmp_path: Path) -> None:
    config = load_config(arm="fp32", dim=2, steps=3, nb_features=(4, 4, 4), learning_rate=1e30)
    train(config, data=cohort_2d, out=tmp_path / "run", progress=False)
    table = evaluate_model(run=tmp_path / "run", data=cohort_2d, out=tmp_path / "t.tsv")
    assert len(table) == 0 and list(table.columns) == list(TABLE_COLUMNS)
    written = pd.read_csv(tmp_path / "t.tsv", sep="\t")
    assert len(written) == 0 and list(written.columns) == list(TABLE_COLUMNS)
    with pytest.raises(FileNotFoundError, match="status.json: not found"):
        evaluate_model(run=tmp_path / "nothing", data=cohort_2d, out=tmp_path / "t.tsv")


def test_evaluate_model_3d(cohort_3d: Path, tmp_path: Path) -> None:
    config = load_config(arm="amp-bf16", dim=3, steps=1, nb_features=(4, 4), held_out_fraction=0.4)
    train(config, data=cohort_3d, out=tmp_path / "run", progress=False)
    table = evaluate_model(run=tmp_path / "run", data=cohort_3d, out=tmp_path / "table.parquet")
    assert set(table.arm) == {"amp-bf16"} and len(table) == 2 * (2 + 4)
    assert pd.read_parquet(tmp_path / "table.parquet").equals(table)
    folding = table[table.metric == "jacobian_nonpositive_percent"].value
    assert (folding == 0).all()
