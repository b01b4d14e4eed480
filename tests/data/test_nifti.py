"""Tests of jaxvae.data.nifti: orientation round trip, validation of bad files, saving."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from jaxvae.base.errors import DataError, OutputError
from jaxvae.data.nifti import load_seg, load_volume, save_volume

# BraTS-like LPS affine: x and y flipped, 1 mm, with an offset
LPS = np.array([[-1.0, 0, 0, 30], [0, -1.0, 0, 40], [0, 0, 1.0, -5], [0, 0, 0, 1]])


def write(path, data, affine=LPS):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def ramp(shape=(20, 24, 18)):
    """A volume whose every voxel is different, so any misplacement shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1


def test_lps_reoriented_to_ras_and_back(tmp_path):
    native = ramp()
    vol = load_volume(write(tmp_path / "a.nii.gz", native))
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, native[::-1, ::-1, :])  # L->R and P->A flips
    np.testing.assert_array_equal(vol.affine, LPS)
    assert vol.shape == native.shape
    np.testing.assert_array_equal(vol.to_native(vol.data), native)

    save_volume(tmp_path / "b.nii.gz", vol.to_native(vol.data), vol.affine)
    back = nib.load(tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), native)
    np.testing.assert_allclose(back.affine, LPS)
    assert back.get_data_dtype() == np.float32


def test_permuted_axes_put_axial_last_and_keep_world_coordinates(tmp_path):
    # native axes are (S, L, P): the axial axis comes first in the file
    affine = np.array([[0, -2.0, 0, 10], [0, 0, -1.5, 20], [3.0, 0, 0, -7], [0, 0, 0, 1]])
    native = ramp((12, 20, 22))
    vol = load_volume(write(tmp_path / "p.nii", native, affine))
    np.testing.assert_array_equal(vol.data, native.transpose(1, 2, 0)[::-1, ::-1, :])
    assert nib.aff2axcodes(vol.ras_affine) == ("R", "A", "S")
    # a voxel has the same world position through either grid
    for ijk in [(0, 0, 0), (5, 7, 3), (19, 21, 11)]:
        value = vol.data[ijk]
        native_ijk = np.argwhere(native == value)[0]
        np.testing.assert_allclose(vol.ras_affine @ [*ijk, 1], affine @ [*native_ijk, 1])
    np.testing.assert_array_equal(vol.to_native(vol.data), native)


def test_4d_single_volume_squeezed_and_index_selects(tmp_path):
    one = load_volume(write(tmp_path / "one.nii.gz", ramp()[..., None]))
    np.testing.assert_array_equal(one.data, ramp()[::-1, ::-1])
    stack = np.stack([ramp(), 2 * ramp(), 3 * ramp()], axis=-1)
    path = write(tmp_path / "many.nii.gz", stack)
    np.testing.assert_array_equal(load_volume(path, volume_index=2).data, 3 * ramp()[::-1, ::-1])
    with pytest.raises(DataError, match="out of range"):
        load_volume(path, volume_index=3)


def _make(kind, path):
    """Write one kind of bad input at `path` (or nothing, for 'missing')."""
    good = ramp()
    if kind == "missing":
        return
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("subject,age\n1,42\n")
    elif kind == "truncated_gzip":
        write(path, good)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "gzip_garbage":
        path.write_bytes(gzip.compress(np.random.default_rng(0).bytes(4000)))
    elif kind == "not_nifti":  # a valid image nibabel reads, but MGH, not NIfTI
        nib.save(nib.MGHImage(good, np.eye(4)), path)
    elif kind == "2d":
        write(path, good[:, :, 0])
    elif kind == "5d":
        write(path, np.ones((20, 20, 20, 2, 2), np.float32))
    elif kind == "4d_many":
        write(path, np.stack([good, good], axis=-1))
    elif kind in ("nan", "inf"):
        bad = good.copy()
        bad[3, 4, 5] = np.nan if kind == "nan" else np.inf
        write(path, bad)
    elif kind == "complex":
        write(path, good.astype(np.complex64))
    elif kind == "absurd_long":  # NIfTI-2: NIfTI-1 cannot even store a 100000 dimension
        data = np.arange(100000, dtype=np.float32).reshape(1, 1, 100000)
        nib.save(nib.Nifti2Image(data, LPS), path)
    elif kind == "huge_header":  # 2000^3 claimed by the header, 1 KB of data: no allocation
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((2000, 2000, 2000))
        hdr.set_data_dtype(np.float32)
        hdr.set_sform(LPS, code=1)
        hdr["vox_offset"] = 352
        path.write_bytes(gzip.compress(hdr.binaryblock + bytes(4) + bytes(1024)))
    elif kind == "absurd_thin":
        write(path, np.ones((8, 200, 200), np.float32) * np.arange(200))
    elif kind == "constant":
        write(path, np.full((20, 20, 20), 7.0, np.float32))
    elif kind == "zeros":
        write(path, np.zeros((20, 20, 20), np.int16))
    else:
        raise AssertionError(kind)


BAD = {"missing": "not found", "folder": "folder", "empty": "empty",
       "text": "not a readable NIfTI", "truncated_gzip": "truncated",
       "gzip_garbage": "not a readable NIfTI", "not_nifti": "not a NIfTI",
       "2d": "2D", "5d": "5D", "4d_many": "volume_index", "nan": "NaN", "inf": "Inf",
       "complex": "not real-valued", "absurd_long": "implausible shape",
       "absurd_thin": "implausible shape", "huge_header": "implausible size",
       "constant": "constant", "zeros": "constant"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_data_error_naming_file(tmp_path, kind):
    name = "bad.mgz" if kind == "not_nifti" else f"bad_{kind}.nii.gz"
    path = tmp_path / name
    _make(kind, path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=BAD[kind]) as err:
        load_volume(path)
    assert name in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_save_refuses_overwrite_and_bad_suffix(tmp_path):
    path = tmp_path / "map.nii.gz"
    save_volume(path, ramp(), LPS)
    with pytest.raises(OutputError, match="exists"):
        save_volume(path, np.zeros((20, 24, 18)), LPS)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), ramp())  # untouched
    save_volume(path, np.zeros((20, 24, 18)), LPS, overwrite=True)
    assert not np.asarray(nib.load(path).dataobj).any()
    with pytest.raises(OutputError, match=r"\.nii"):
        save_volume(tmp_path / "map.png", ramp(), LPS)
    with pytest.raises(OutputError, match="3D"):
        save_volume(tmp_path / "flat.nii", np.zeros((4, 4)), LPS)
    assert sorted(os.listdir(tmp_path)) == ["map.nii.gz"]


def test_load_seg_float_and_multilabel_to_bool_on_reoriented_grid(tmp_path):
    vol = load_volume(write(tmp_path / "img.nii.gz", ramp()))
    labels = np.zeros((20, 24, 18), np.float32)
    labels[2:5, 3:6, 4:7] = 1
    labels[10, 10, 10] = 4
    seg = load_seg(write(tmp_path / "seg.nii.gz", labels), vol)
    assert seg.dtype == bool
    np.testing.assert_array_equal(seg, (labels > 0)[::-1, ::-1, :])
    seg16 = load_seg(write(tmp_path / "seg16.nii.gz", labels.astype(np.uint8)), vol)
    np.testing.assert_array_equal(seg16, seg)


@pytest.mark.parametrize("kind,match", [("shape", "shape"), ("affine", "affines differ"),
                                        ("fraction", "not integers"), ("negative", "negative")])
def test_load_seg_mismatch_names_both_files(tmp_path, kind, match):
    vol = load_volume(write(tmp_path / "img.nii.gz", ramp()))
    labels = np.zeros((20, 24, 18), np.float32)
    affine = LPS
    if kind == "shape":
        labels = np.zeros((20, 24, 17), np.float32)
    elif kind == "affine":
        affine = LPS + np.diag([0, 0, 0.5, 0])
    elif kind == "fraction":
        labels[1, 1, 1] = 0.3
    else:
        labels[1, 1, 1] = -1
    path = write(tmp_path / "seg.nii.gz", labels, affine)
    with pytest.raises(DataError, match=match) as err:
        load_seg(path, vol)
    assert "seg.nii.gz" in str(err.value) and "img.nii.gz" in str(err.value)
