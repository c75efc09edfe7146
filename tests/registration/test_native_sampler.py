"""The C sampler (compiled on first use) against the numba kernels it stands in for, and its build."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from dynomp import native
from dynomp.registration import interpolation
from dynomp.registration.transforms import identity_coordinates


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(7)


needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


def sample_both_ways(monkeypatch, function, volume, points, weights):
    """Values and gradient from the C kernels, then from the numba kernels."""
    results = []
    for kernels in (None, {}):  # None: load the C kernels; {}: none, so numba runs
        monkeypatch.setattr(interpolation, "_native_kernels", kernels)
        ours = points.clone().requires_grad_(True)
        values = function(volume, ours)
        (gradient,) = torch.autograd.grad((values * weights).sum(), ours)
        results.append((values.detach(), gradient))
    return results


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(17, 20, 19), (1, 9, 11)])
def test_c_sampler_gives_the_numba_kernels_numbers(monkeypatch, generator, dtype, channels, shape):
    assert interpolation.native_kernels(), "a C compiler is here, so the C kernels must load"
    volume = torch.rand(channels, *shape, dtype=dtype, generator=generator)
    # large enough that some points leave the grid and get clamped
    displacement = 3 * torch.randn(3, *shape, dtype=dtype, generator=generator)
    coordinates = (identity_coordinates(shape, dtype=dtype) + displacement).reshape(3, -1)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for function, points in ((interpolation.displaced_sample, displacement),
                             (interpolation.trilinear_sample, coordinates)):
        weights = torch.rand(channels, *points.shape[1:], dtype=dtype, generator=generator)
        (values, gradient), (expected_values, expected_gradient) = sample_both_ways(
            monkeypatch, function, volume, points, weights)
        assert values.dtype == dtype and gradient.dtype == dtype
        assert float((values - expected_values).abs().max()) <= tolerance
        assert float((gradient - expected_gradient).abs().max()) <= tolerance * float(expected_gradient.abs().max())
        # clamped axes get no gradient, the rest do
        assert int((gradient == 0).sum()) > 0 and int((gradient != 0).sum()) > 0.3 * gradient.numel()
        assert torch.equal(gradient == 0, expected_gradient == 0)


@needs_compiler
def test_the_build_is_cached_and_leaves_nothing_half_written(tmp_path):
    first = native.build("registration/sampler", folder=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = native.build("registration/sampler", folder=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert first.name.startswith("registration-sampler-") and first.suffix == ".so"


def test_a_failing_compiler_is_named_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a real program that exits 1
    with pytest.raises(RuntimeError, match=r"sampler\.c: the C compiler failed: exit status 1"):
        native.build("registration/sampler", folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_a_compiler_or_when_switched_off_the_numba_kernels_run(monkeypatch, tmp_path, generator):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(FileNotFoundError, match=r"sampler\.c: no C compiler found"):
        native.build("registration/sampler", folder=tmp_path)
    monkeypatch.setattr(native, "_loaded", {})
    assert native.library("registration/sampler") is None
    monkeypatch.setattr(interpolation, "_native_kernels", None)
    assert interpolation.native_kernels() == {}
    volume = torch.rand(1, 6, 7, 8, dtype=torch.float64, generator=generator)
    centres = identity_coordinates((6, 7, 8), dtype=torch.float64).reshape(3, -1)
    assert torch.allclose(interpolation.trilinear_sample(volume, centres), volume.reshape(1, -1), atol=1e-12)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("DYNOMP_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", {})
    assert not native.enabled() and native.library("registration/sampler") is None


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNOMP_CACHE_DIR", str(tmp_path / "mine"))
    assert native.cache_folder() == tmp_path / "mine"
    monkeypatch.delenv("DYNOMP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_folder() == tmp_path / "xdg" / "dynomp"
    # a cache home that cannot hold a folder (here a file; in a container, a read-only home)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert native.cache_folder().parent == Path(tempfile.gettempdir())
    assert native.cache_folder().name.startswith("dynomp-native-")
