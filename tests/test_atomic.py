"""Atomic outputs: complete or absent, never half-written."""

import json
import math

import pytest

from dynomp.atomic import atomic_path, write_json_atomic


def test_success_renames_into_place_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "out.nii.gz"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.endswith(".tmp.nii.gz")
        temporary.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert [p.name for p in target.parent.iterdir()] == ["out.nii.gz"]


def test_result_has_the_permissions_of_a_plain_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_failure_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("{half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_complete_file(tmp_path):
    target = write_json_atomic(tmp_path / "m.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("garbage")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}


def test_json_writes_nan_as_null(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"dice": [0.5, math.nan], "x": {"y": math.nan}})
    assert json.loads(path.read_text()) == {"dice": [0.5, None], "x": {"y": None}}
