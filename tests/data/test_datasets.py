"""Tests of jaxvae.data.datasets: finding cases, SliceSet, cached loading, splits, real data."""

import os

import nibabel as nib
import numpy as np
import pytest

from jaxvae.base.errors import ConfigError, DataError
from jaxvae.data import datasets, nifti
from jaxvae.data.datasets import (
    Case,
    SliceSet,
    find_brats_cases,
    find_volumes,
    load_slices,
)
from jaxvae.data.preprocess import PreprocessParams, brain_mask, maps_to_volume, preprocess_volume
from jaxvae.data.splits import split_cases

LPS = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 39], [0, 0, 1.0, 0], [0, 0, 0, 1]])
SMALL = PreprocessParams(size=32, min_brain_pixels=1)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_case(folder, name, *, seed=0, lesion=True, mask=False):
    """A small (40, 36, 30) brain volume (+ seg, + brain mask) written as NIfTI."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((40, 36, 30), np.int16)
    vol[6:34, 5:31, 3:27] = rng.integers(100, 200, (28, 26, 24))
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, LPS), folder / f"{name}.nii.gz")
    if lesion:
        seg = np.zeros(vol.shape, np.uint8)
        seg[10:20, 10:20, 8:14] = 2
        nib.save(nib.Nifti1Image(seg, LPS), folder / f"{name.rsplit('_', 1)[0]}_seg.nii.gz")
    if mask:
        m = np.zeros(vol.shape, np.uint8)
        m[8:30, 8:28, 3:27] = 1
        nib.save(nib.Nifti1Image(m, LPS), folder / f"{name}_mask.nii.gz")


def test_find_brats_cases_modality_aliases_and_layouts(tmp_path):
    for f in ["Case_B/Case_B_T2.nii.gz", "Case_A/Case_A_t2.nii", "Case_A/Case_A_seg.nii.gz",
              "Case_A/Case_A_flair.nii.gz", "Case_A/Case_A_t1.nii.gz",
              "Case_A/Case_A_t1ce.nii.gz", "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w.nii.gz",
              "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz",
              "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz", "docs/README.txt"]:
        touch(tmp_path / f)
    cases = find_brats_cases(tmp_path, "t2")
    assert [c.case_id for c in cases] == ["BraTS-GLI-00001-000", "Case_A", "Case_B"]
    assert [c.image_path.name for c in cases] == [
        "BraTS-GLI-00001-000-t2w.nii.gz", "Case_A_t2.nii", "Case_B_T2.nii.gz"]
    assert [c.seg_path and c.seg_path.name for c in cases] == [
        "BraTS-GLI-00001-000-seg.nii.gz", "Case_A_seg.nii.gz", None]
    assert find_brats_cases(tmp_path, "T2W") == cases
    t1 = find_brats_cases(tmp_path / "Case_A", "t1n")  # a single case folder as root
    assert [c.image_path.name for c in t1] == ["Case_A_t1.nii.gz"]  # not _t1ce
    t1c = find_brats_cases(tmp_path / "Case_A", "t1c")
    assert t1c[0].image_path.name == "Case_A_t1ce.nii.gz"
    with pytest.raises(DataError, match="Case_B: no t2f image .*_flair or _t2f") as err:
        find_brats_cases(tmp_path, "t2f")
    assert "Case_B_T2.nii.gz" in str(err.value)  # lists what is there
    with pytest.raises(DataError, match="not found"):
        find_brats_cases(tmp_path / "nowhere", "t2")
    with pytest.raises(DataError, match="no case folders"):
        find_brats_cases(tmp_path / "docs", "t2")


def test_find_volumes_with_masks(tmp_path):
    for f in ["sub02.nii", "sub01.nii.gz", "sub02_brainmask.nii.gz", "notes.txt"]:
        touch(tmp_path / "h" / f)
    cases = find_volumes(tmp_path / "h")
    assert cases == [Case("sub01", tmp_path / "h/sub01.nii.gz"),
                     Case("sub02", tmp_path / "h/sub02.nii",
                          mask_path=tmp_path / "h/sub02_brainmask.nii.gz")]
    touch(tmp_path / "h/sub03_mask.nii")
    with pytest.raises(DataError, match="without a volume: sub03_mask.nii"):
        find_volumes(tmp_path / "h")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no .nii"):
        find_volumes(tmp_path / "empty")


def tiny_set(case_id, n, lesion_slices=()):
    lesion = np.zeros((n, 4, 4), bool)
    lesion[list(lesion_slices), 1, 1] = True
    return SliceSet(images=np.arange(n * 16, dtype=np.float32).reshape(n, 4, 4),
                    brain=np.ones((n, 4, 4), bool), lesion=lesion, case_ids=[case_id] * n,
                    slice_index=np.arange(n) + 10)


def test_sliceset_operations():
    s = SliceSet.concat([tiny_set("b", 3, [1]), tiny_set("a", 2)])
    assert len(s) == 5 and s.cases == ["a", "b"]
    assert s.slice_index.dtype == np.int32 and s.case_ids.tolist() == ["b"] * 3 + ["a"] * 2
    np.testing.assert_array_equal(s.subset([4, 0]).slice_index, [11, 10])
    np.testing.assert_array_equal(s.subset(s.case_ids == "b").images, tiny_set("b", 3).images)
    assert s.for_cases(["a"]).case_ids.tolist() == ["a", "a"]
    free = s.lesion_free()
    assert len(free) == 4 and not free.lesion.any()
    assert free.case_ids.tolist() == ["b", "b", "a", "a"]
    np.testing.assert_array_equal(free.slice_index, [10, 12, 10, 11])
    with pytest.raises(ValueError, match="inconsistent"):
        SliceSet(s.images, s.brain[:-1], s.lesion, s.case_ids, s.slice_index)


def test_load_slices_shapes_and_healthy_masks(tmp_path):
    write_case(tmp_path / "brats/C1", "C1_t2", seed=1)
    write_case(tmp_path / "brats/C2", "C2_t2", seed=2)
    write_case(tmp_path / "healthy", "vol", lesion=False, mask=True)
    s = load_slices(find_brats_cases(tmp_path / "brats", "t2"), SMALL)
    assert s.images.shape[1:] == (32, 32) and s.cases == ["C1", "C2"]
    assert s.lesion.any() and len(s.lesion_free()) < len(s)
    assert set(s.geometries) == {"C1", "C2"}
    np.testing.assert_array_equal(s.for_cases(["C1"]).slice_index, s.geometries["C1"].slices)

    h = load_slices(find_volumes(tmp_path / "healthy"), SMALL)
    assert not h.lesion.any() and h.cases == ["vol"]
    # the mask file, not the non-zero voxels, defines the brain: (22, 20) of the 40x36 slice
    assert (h.brain.sum(axis=(1, 2)) < 0.9 * 28 * 26 * (32 / 40) ** 2).all()


def test_cache_hit_reads_no_nifti_and_content_keys_it(tmp_path, monkeypatch):
    write_case(tmp_path / "d/C1", "C1_t2", seed=1)
    write_case(tmp_path / "d/C2", "C2_t2", seed=2)
    cases = find_brats_cases(tmp_path / "d", "t2")
    cache = tmp_path / "cache"
    first = load_slices(cases, SMALL, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2

    def boom(*args, **kwargs):
        raise AssertionError("NIfTI read on a cache hit")

    monkeypatch.setattr(nifti, "load_volume", boom)
    monkeypatch.setattr(nifti, "load_seg", boom)
    again = load_slices(cases, SMALL, cache_dir=cache)
    for f in ("images", "brain", "lesion", "case_ids", "slice_index"):
        np.testing.assert_array_equal(getattr(again, f), getattr(first, f))
    assert again.geometries == first.geometries

    with pytest.raises(AssertionError, match="cache hit"):  # other params: a miss
        load_slices(cases, PreprocessParams(size=16, min_brain_pixels=1), cache_dir=cache)
    write_case(tmp_path / "d/C2", "C2_t2", seed=3)  # same names, new content: a miss
    with pytest.raises(AssertionError, match="cache hit"):
        load_slices(cases, SMALL, cache_dir=cache)

    monkeypatch.undo()
    for f in cache.glob("*.npz"):
        f.write_bytes(b"damaged")  # a damaged cache is rebuilt, not fatal
    rebuilt = load_slices(cases[:1], SMALL, cache_dir=cache)
    np.testing.assert_array_equal(rebuilt.images, first.for_cases(["C1"]).images)


def test_bad_case_raises_naming_file_and_caches_nothing(tmp_path):
    write_case(tmp_path / "d/C1", "C1_t2")
    bad = tmp_path / "d/C1/C1_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 36, 29), np.uint8), LPS), bad)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="shape") as err:
        load_slices(find_brats_cases(tmp_path / "d", "t2"), SMALL, cache_dir=cache)
    assert "C1_seg.nii.gz" in str(err.value) and "C1_t2.nii.gz" in str(err.value)
    assert not cache.exists() or not os.listdir(cache)


def test_split_cases_by_case_disjoint_covering_deterministic():
    ids = [f"c{i:02d}" for i in range(10)]
    per_slice = np.repeat(ids, 7)[::-1]  # order and repeats must not matter
    tests = []
    for fold in range(3):
        train, test = split_cases(per_slice, 3, fold, seed=0)
        assert (train, test) == split_cases(ids, 3, fold, seed=0)
        assert not set(train) & set(test) and sorted(train + test) == ids
        tests.append(test)
    assert sorted(sum(tests, [])) == ids and sorted(map(len, tests)) == [3, 3, 4]
    assert any(split_cases(ids, 3, f, seed=1)[1] != tests[f] for f in range(3))
    assert split_cases(ids, 1, 0) == (ids, [])
    for n, f in [(0, 0), (3, 3), (3, -1), (11, 0)]:
        with pytest.raises(ConfigError):
            split_cases(ids, n, f)


def test_split_applied_to_sliceset_keeps_cases_whole():
    s = SliceSet.concat([tiny_set(c, 3) for c in "abcde"])
    train, test = split_cases(s.case_ids, 5, 2)
    tr, te = s.for_cases(train), s.for_cases(test)
    assert len(tr) + len(te) == len(s) and len(te) == 3
    assert not set(tr.cases) & set(te.cases)


def dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def centre_mm(mask, affine):
    return (affine @ [*np.argwhere(mask).mean(axis=0), 1])[:3]


def test_real_brats2021_round_trip(shared_data, tmp_path):
    (case,) = find_brats_cases(shared_data / "brats2021_t2", "t2")
    assert case.case_id == "BraTS2021_00006" and case.seg_path is not None
    vol = nifti.load_volume(case.image_path)
    seg = nifti.load_seg(case.seg_path, vol)
    images, brain64, lesion64, geo = preprocess_volume(vol.data, PreprocessParams(), lesion=seg)
    assert images.shape[1:] == (64, 64) and 80 < len(images) < 155
    kept = list(geo.slices)

    brain_back = maps_to_volume(brain64.astype(np.float32), geo) > 0.5
    assert dice(brain_back[:, :, kept], brain_mask(vol.data)[:, :, kept]) > 0.9

    out = tmp_path / "lesion_map.nii.gz"
    nifti.save_volume(out, vol.to_native(maps_to_volume(lesion64.astype(np.float32), geo)),
                      vol.affine)
    saved, original = nib.load(out), nib.load(case.image_path)
    assert saved.shape == original.shape
    np.testing.assert_allclose(saved.affine, original.affine)
    in_kept = np.zeros_like(seg)
    in_kept[:, :, kept] = seg[:, :, kept]
    reference = vol.to_native(in_kept)  # the native tumour, in the slices the model sees
    shift = centre_mm(np.asarray(saved.dataobj) > 0.5, saved.affine) - centre_mm(reference,
                                                                                  vol.affine)
    assert np.linalg.norm(shift) < 2.0


def test_real_brats2018_flair_case(shared_data, tmp_path):
    cases = find_brats_cases(shared_data / "brats2018_flair", "flair")
    assert len(cases) == 10 and all(c.seg_path for c in cases)
    s = load_slices(cases[:1], cache_dir=tmp_path)
    assert s.images.shape[1:] == (64, 64) and s.cases == [cases[0].case_id]
    assert s.images.min() >= -1.5 and s.images.max() <= 1.5
    with_lesion = s.lesion.any(axis=(1, 2))
    assert 0 < with_lesion.sum() < len(s)
    assert (s.lesion & s.brain).sum() > 0.95 * s.lesion.sum()  # tumour lies in the brain


def test_equalized_is_the_per_case_brain_cdf():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8)).astype(np.float32)
    images[2:] = images[2:] * 10 + 5  # the second case on another scale
    brain = np.ones((4, 8, 8), bool)
    brain[:, 0] = False
    s = SliceSet(images, brain, np.zeros_like(brain), ["a", "a", "b", "b"], np.arange(4))
    eq = datasets.equalized(s)
    assert (eq[~brain] == 0).all()
    for rows in ([0, 1], [2, 3]):
        v, e = images[rows][brain[rows]], eq[rows][brain[rows]]
        np.testing.assert_array_equal(np.argsort(v, kind="stable"), np.argsort(e, kind="stable"))
        np.testing.assert_allclose(np.sort(e), np.arange(1, v.size + 1) / v.size)
