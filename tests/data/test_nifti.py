"""NIfTI I/O: round trips, and each kind of bad file gets a one-line error naming it."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from dynomp.data.nifti import NiftiError, check_same_grid, read_volume, write_volume

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def write_bytes(path, payload):
    path.write_bytes(payload)
    return path


def patch_header(path, **fields):
    """Write a valid image, then overwrite header fields in the file (nibabel would fix them)."""
    path = path.with_suffix("").with_suffix(".nii")  # uncompressed, to patch in place
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), dtype=np.float32), AFFINE), str(path))
    with open(path, "r+b") as handle:
        header = nib.Nifti1Header.from_fileobj(handle)
        for name, value in fields.items():
            header[name] = value
        handle.seek(0)
        handle.write(header.binaryblock)
    return path


def save_with_zero_size_axis(path):
    """A header that declares a zero-length second axis."""
    return patch_header(path, dim=[3, 3, 0, 3, 1, 1, 1, 1])


def save_with_singular_affine(path):
    """An sform whose second row is zero, and no qform."""
    return patch_header(path, qform_code=0, sform_code=1, srow_y=[0.0, 0.0, 0.0, 0.0])


def test_round_trip_keeps_values_affine_and_spacing(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = write_volume(tmp_path / "image.nii.gz", data, AFFINE)
    volume = read_volume(path)
    assert volume.data.dtype == np.float64 and np.array_equal(volume.data, data.astype(np.float64))
    assert np.array_equal(volume.affine, AFFINE) and volume.spacing == (2.0, 2.0, 2.0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_labels_come_back_as_int32_and_trailing_singleton_axis_is_squeezed(tmp_path):
    labels = np.zeros((4, 4, 4, 1), dtype=np.float32)
    labels[1:3, 1:3, 1:3] = 7
    volume = read_volume(save(tmp_path / "labels.nii.gz", labels), labels=True)
    assert volume.data.dtype == np.int32 and volume.shape == (4, 4, 4)
    assert set(np.unique(volume.data)) == {0, 7}


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: write_bytes(p, b"not a nifti at all"), "cannot be read|not a NIfTI"),
        (lambda p: write_bytes(p, gzip.compress(b"\x00" * 10)), "cannot be read|not a NIfTI"),
        (lambda p: save(p, np.zeros((3, 3, 3, 2))), r"4-D image"),
        (lambda p: save(p, np.full((3, 3, 3), np.nan)), "27 NaN or infinite"),
        (lambda p: save(p, np.array([[[1.0, np.inf]]])), "1 NaN or infinite"),
        (save_with_zero_size_axis, "zero-size dimension"),
        (save_with_singular_affine, "singular"),
    ],
)
def test_bad_files_get_one_line_errors_naming_the_file(tmp_path, make, problem):
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(NiftiError, match=problem) as error:
        read_volume(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_truncated_file(tmp_path):
    path = save(tmp_path / "whole.nii.gz", np.random.default_rng(1).normal(size=(20, 20, 20)))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(NiftiError, match=r"truncated\.nii\.gz: cannot be read"):
        read_volume(truncated)


def test_missing_file_and_non_integer_labels(tmp_path):
    with pytest.raises(NiftiError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")
    path = save(tmp_path / "soft.nii.gz", np.full((2, 2, 2), 0.5, dtype=np.float32))
    with pytest.raises(NiftiError, match="non-integer values"):
        read_volume(path, labels=True)
    assert read_volume(path).data[0, 0, 0] == 0.5  # fine as an image


def test_check_same_grid_names_the_second_file(tmp_path):
    a = read_volume(save(tmp_path / "a.nii.gz", np.zeros((3, 3, 3))))
    b = read_volume(save(tmp_path / "b.nii.gz", np.zeros((3, 3, 4))))
    c = read_volume(save(tmp_path / "c.nii.gz", np.zeros((3, 3, 3)), np.diag([1.0, 1, 1, 1])))
    check_same_grid(a, a, first_name="a", second_name="a")
    with pytest.raises(NiftiError, match=r"^b: grid shape \(3, 3, 4\)"):
        check_same_grid(a, b, first_name="a", second_name="b")
    with pytest.raises(NiftiError, match="^c: affine differs"):
        check_same_grid(a, c, first_name="a", second_name="c")
