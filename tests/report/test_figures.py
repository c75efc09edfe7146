"""`dynomp figures`: files that exist and parse, and what each figure draws."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from dynomp.cli import main
from dynomp.precision.formats import FORMATS
from dynomp.report.figures import (
    FIGURE_NAMES,
    FORMAT_COLOURS,
    MEBIBYTE,
    build_figures,
    loss_curves_figure,
    pmin_traces_figure,
    registration_by_arm_figure,
)
from dynomp.report.tables import write_tables

from .conftest import DIVERGING_RUN, REGISTRATION_ARMS, SUBJECTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_TAG = "{http://www.w3.org/2000/svg}svg"


def _check_files(folder: Path) -> dict[str, str]:
    """Every figure as a PNG and an SVG that parse; the SVGs' text, by name."""
    texts = {}
    for name in FIGURE_NAMES:
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        svg = (folder / f"{name}.svg").read_text()
        assert ElementTree.fromstring(svg).tag == SVG_TAG
        texts[name] = svg
    return texts


def test_figures_of_the_study(study_tables, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["figures", "--tables", str(study_tables), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f"{n}{s}") for n in FIGURE_NAMES
                                     for s in (".png", ".svg"))
    texts = _check_files(out)
    # matplotlib writes each text of an SVG as a comment beside its glyphs
    for name, precision in (("bf16", 8), ("fp16", 11), ("fp32", 24), ("fp64", 53)):
        assert f"<!-- {name} p={precision} -->" in texts["pmin_traces"]
    assert "<!-- p_min of the dynomp arm, sub-01 -->" in texts["pmin_traces"]
    assert "<!-- fp16: diverged at step 2 -->" in texts["loss_curves"]
    # one panel per set-up: the 2-D and the 3-D fp32 runs are not one line
    for title in ("training loss (registration, 2-D)", "training loss (registration, 3-D)"):
        assert f"<!-- {title} -->" in texts["loss_curves"]
    for label in ("fp32 (registration, 2-D)", "fp32 (registration, 3-D)",
                  "fp16 (registration, 2-D)"):
        assert f"<!-- {label} -->" in texts["learning_by_arm"]
    assert "<!-- diverged at step 2 -->" in texts["learning_by_arm"]
    assert "no data" not in "".join(texts.values())


def test_pmin_traces_draw_each_stage_level_coloured_by_format(study_tables):
    trace = pd.read_parquet(study_tables / "registration_trace.parquet")
    runs = pd.read_parquet(study_tables / "runs.parquet")
    figure = pmin_traces_figure(trace=trace, runs=runs)
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title() for axes in panels] == [
        f"{stage}, level {level}" for stage in ("rigid", "affine", "syn") for level in (0, 1)]
    shown = trace[(trace.arm == "dynomp") & (trace.subject == SUBJECTS[0])]
    for axes in panels:
        stage, level = axes.get_title().replace(" level ", "").split(",")
        rows = shown[(shown.stage == stage) & (shown.level == int(level))].sort_values("iteration")
        # a dashed line at p of each format in the dynomp arm's set: bf16, fp16, fp32, fp64
        thresholds = sorted(line.get_ydata()[0] for line in axes.get_lines()
                            if line.get_linestyle() == "--")
        assert thresholds == [8, 11, 24, 53]
        # the shown subject's smoothed p_min, one point per iteration, in its format's colour
        (points,) = axes.collections
        np.testing.assert_allclose(points.get_offsets()[:, 1], rows.pmin_smoothed)
        np.testing.assert_allclose(points.get_facecolors(),
                                   [to_rgba(FORMAT_COLOURS[f]) for f in rows.format])
        # the other two subjects' smoothed p_min, faint
        faint = [line for line in axes.get_lines() if line.get_alpha() == 0.3]
        assert len(faint) == len(SUBJECTS) - 1
    assert set(FORMAT_COLOURS) == set(FORMATS)


def test_registration_by_arm_plots_one_point_per_subject(study_tables):
    metrics = pd.read_parquet(study_tables / "registration_metrics.parquet")
    figure = registration_by_arm_figure(metrics=metrics)
    dice_axes, _, _, memory_axes = figure.axes
    arms = [label.get_text() for label in dice_axes.get_xticklabels()]
    assert arms == ["fp64", "fp32", "fp16", "dynomp"]
    scalars = metrics[metrics.label == ""].pivot_table(
        index=["subject", "arm"], columns="metric", values="value")
    for axes, column in ((dice_axes, "dice_mean"), (memory_axes, None)):
        kept = [line for line in axes.get_lines()
                if line.get_marker() == "o" and len(line.get_xdata())]
        crosses = [line for line in axes.get_lines() if line.get_marker() == "x"]
        for position, arm in enumerate(arms):
            rows = scalars.xs(arm, level="arm")
            if column is None:
                expected = rows[["peak_rss_bytes", "peak_child_rss_bytes"]].max(axis=1) / MEBIBYTE
            else:
                expected = rows[column]
            if arm == DIVERGING_RUN[1]:
                (cross,) = crosses
                assert cross.get_ydata() == pytest.approx(expected.to_numpy())
                assert np.abs(cross.get_xdata() - position).max() < 0.2
                continue
            (line,) = [line for line in kept if abs(np.mean(line.get_xdata()) - position) < 0.2]
            assert sorted(line.get_ydata()) == pytest.approx(sorted(expected.to_numpy()))
            assert len(line.get_ydata()) == len(SUBJECTS)


def test_loss_curves_without_training_show_registration_loss_per_arm(study, tmp_path):
    tables = write_tables(out=tmp_path, registration_runs=study["registration_runs"])
    figure = loss_curves_figure(learning_trace=tables["learning_trace"],
                                registration_trace=tables["registration_trace"],
                                runs=tables["runs"])
    assert [axes.get_title() for axes in figure.axes] == ["rigid", "affine", "syn"]
    trace = tables["registration_trace"]
    for axes in figure.axes:
        lines = {line.get_label(): line for line in axes.get_lines()
                 if not line.get_label().startswith("_")}
        # sub-01 has the most arms; its fp16 run diverged before any iteration
        assert set(lines) == set(REGISTRATION_ARMS)
        for arm, line in lines.items():
            rows = trace[(trace.subject == "sub-01") & (trace.arm == arm)
                         & (trace.stage == axes.get_title())].sort_values(["level", "iteration"])
            np.testing.assert_allclose(line.get_ydata(), rows.loss)


def test_empty_tables_give_no_data_figures(tmp_path, capsys):
    assert main(["tables", "--out", str(tmp_path / "tables")]) == 0
    assert main(["figures", "--tables", str(tmp_path / "tables"), "--out", str(tmp_path)]) == 0
    texts = _check_files(tmp_path)
    assert "no data: no registration trace with p_min values" in texts["pmin_traces"]
    assert "no data: no training or registration trace" in texts["loss_curves"]
    assert "no data: no registration metrics" in texts["registration_by_arm"]
    assert "no data: no training runs" in texts["learning_by_arm"]


def test_missing_tables_are_a_one_line_error(study_tables, tmp_path, capsys):
    assert main(["figures", "--tables", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"dynomp figures: error: {tmp_path / 'none'}: not a directory (write it with " \
        "`dynomp tables`)"
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "runs.parquet").write_bytes((study_tables / "runs.parquet").read_bytes())
    with pytest.raises(FileNotFoundError, match="registration_trace.parquet: not found"):
        build_figures(tables=partial)


def test_gpu_memory_is_drawn_beside_resident_memory():
    rows = []
    for subject, (rss, gpu) in {"sub-01": (3 * MEBIBYTE, 100 * MEBIBYTE),
                                "sub-02": (4 * MEBIBYTE, 120 * MEBIBYTE)}.items():
        for metric, value in (("dice_mean", 0.8), ("peak_rss_bytes", rss),
                              ("peak_child_rss_bytes", 0.0), ("peak_gpu_bytes", gpu)):
            rows.append({"subject": subject, "arm": "fp32", "status": "completed",
                         "metric": metric, "label": "", "value": value})
    figure = registration_by_arm_figure(metrics=pd.DataFrame(rows))
    memory_axes = figure.axes[3]
    (gpu,) = [line for line in memory_axes.get_lines() if line.get_marker() == "^"]
    assert sorted(gpu.get_ydata()) == [100.0, 120.0]
    (resident,) = [line for line in memory_axes.get_lines()
                   if line.get_marker() == "o" and len(line.get_xdata())]
    assert sorted(resident.get_ydata()) == [3.0, 4.0]
    assert [text.get_text() for text in memory_axes.get_legend().get_texts()] == [
        "resident (process or child)", "GPU"]
