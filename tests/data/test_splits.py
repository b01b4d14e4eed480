import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import jaxvae
from jaxvae.base.errors import ConfigError, OutputError
from jaxvae.data import datasets, phantom, splits
from jaxvae.data.datasets import SliceSet
from jaxvae.inference.settings import EvalSettings
from jaxvae.report import scans


def _set(case_lesion):
    n = len(case_lesion) * 2
    lesion = np.zeros((n, 8, 8), bool)
    for i, sick in enumerate(case_lesion):
        lesion[2 * i, 2, 2] = sick  # one of the two slices of a sick case has a lesion
    return SliceSet(np.zeros((n, 8, 8)), np.ones((n, 8, 8)), lesion,
                    np.repeat([f"c{i}" for i in range(len(case_lesion))], 2), np.arange(n))


def test_split_healthy_cohort_trains_and_lesion_cases_test():
    s = _set([False] * 10 + [True] * 10)
    split = splits.make_split(s, seed=3)
    healthy, sick = {f"c{i}" for i in range(10)}, {f"c{i}" for i in range(10, 20)}
    # ~10 % of each held out: one healthy case (validation loss), one lesion case (thresholds)
    assert len(set(split.val) & healthy) == 1 and len(set(split.val) & sick) == 1
    # and ~10 % of the healthy cases test beside the lesion cases: healthy test brains
    healthy_test = set(split.test) & healthy
    assert len(healthy_test) == 1 and not healthy_test & set(split.val)
    assert set(split.train) == healthy - set(split.val) - healthy_test
    assert set(split.test) == (sick - set(split.val)) | healthy_test
    train, val, test = split.slices(s)
    assert not train.lesion.any() and train.cases == list(split.train)
    assert val.cases == list(split.val) and test.cases == list(split.test)
    assert splits.make_split(s, seed=3) == split and splits.make_split(s, seed=4) != split


def test_split_holds_out_healthy_test_cases_only_beside_lesion_cases():
    for n_healthy, want in [(2, 0), (3, 1), (10, 1), (30, 3)]:
        s = _set([False] * n_healthy + [True] * 4)
        healthy = {f"c{i}" for i in range(n_healthy)}
        for seed in range(4):
            split = splits.make_split(s, seed=seed)
            test = set(split.test) & healthy
            assert len(test) == want, (n_healthy, seed)
            assert not test & set(split.val) and split.train  # disjoint, training kept
            sick = {f"c{i}" for i in range(n_healthy, n_healthy + 4)}
            assert set(split.test) - healthy == sick - set(split.val)
            assert splits.make_split(s, seed=seed) == split  # deterministic
    # which healthy cases test changes with the seed
    s = _set([False] * 30 + [True] * 4)
    assert len({splits.make_split(s, seed=k).test for k in range(6)}) > 1
    # with half the healthy cases validating, the healthy test cases still leave training
    split = splits.make_split(_set([False] * 4 + [True] * 4), val_fraction=0.5)
    assert len(split.train) == 1 and len(set(split.test) - {"c4", "c5", "c6", "c7"}) == 1
    # a cohort without any lesion case keeps its test part empty; no healthy test at 0
    assert splits.make_split(_set([False] * 10)).test == ()
    assert not set(splits.make_split(_set([False] * 10 + [True] * 4), val_fraction=0).test) & {
        f"c{i}" for i in range(10)}


def test_split_without_healthy_case_trains_on_lesion_free_slices_of_every_case():
    s = _set([True] * 6)
    split = splits.make_split(s)
    assert len(split.val) == 1 and not split.test  # the test is another dataset
    assert sorted([*split.train, *split.val]) == s.cases
    train, val, _ = split.slices(s)
    assert not train.lesion.any() and len(train) == len(split.train)  # one healthy slice each
    assert val.lesion.any()  # validation cases keep their lesion slices (thresholds)
    assert splits.make_split(s, val_fraction=0).val == ()


def test_split_cross_validation_holds_out_validation_from_the_training_folds():
    s = _set([True] * 20)
    seen = set()
    for fold in range(2):
        split = splits.make_split(s, folds=2, fold=fold)
        assert len(split.test) == 10 and len(split.val) == 1 and len(split.train) == 9
        seen |= set(split.test)
    assert seen == set(s.cases)


def test_split_file_round_trip_and_refusals(tmp_path):
    s = _set([False, False, True, True])
    split = splits.make_split(s, val_fraction=0.5)
    path = tmp_path / "split.json"
    splits.write_split(split, path)
    assert json.loads(path.read_text()) == split.to_dict()
    assert splits.read_split(path, s.cases) == split
    bad = {"two parts": ({"train": ["c0", "c1"], "test": ["c1"]}, "both 'train' and 'test'"),
           "unknown": ({"train": ["c0", "nope"]}, "not in the dataset.*'nope'"),
           "empty train": ({"train": [], "val": ["c0"]}, "no training case"),
           "extra key": ({"train": ["c0"], "tset": ["c1"]}, "keys"),
           "not ids": ({"train": "c0"}, "list of case ID")}
    for name, (content, msg) in bad.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=msg) as e:
            splits.read_split(f, s.cases)
        assert str(f) in str(e.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        splits.read_split(tmp_path / "broken.json", s.cases)


def test_find_cases_kinds(tmp_path):
    phantom.write_brats(tmp_path / "brats", n_healthy=1, n_lesion=1, shape=(48, 48, 32),
                        spacing=(4, 4, 4), modalities=("t2",))
    cases, desc = datasets.find_cases(tmp_path / "brats", "t2")
    assert desc["source"] == "brats" and len(cases) == 2 and cases[1].seg_path is not None
    vol = cases[0].image_path
    cases, desc = datasets.find_cases(vol)
    assert desc["source"] == "volume" and cases[0].case_id == "phantom_healthy_000_t2"
    (tmp_path / "healthy").mkdir()
    (tmp_path / "healthy" / "a.nii.gz").write_bytes(vol.read_bytes())
    assert datasets.find_cases(tmp_path / "healthy")[1]["source"] == "healthy"
    with pytest.raises(jaxvae.DataError, match="nope"):
        datasets.find_cases(tmp_path / "nope")


def test_score_volume_writes_maps_on_the_input_grid(tmp_path):
    phantom.write_brats(tmp_path / "d", n_healthy=0, n_lesion=1, shape=(60, 52, 40),
                        spacing=(3, 3, 3), modalities=("t2",))
    path = tmp_path / "d" / "phantom_lesion_000" / "phantom_lesion_000_t2.nii.gz"
    model = jaxvae.ConvVAE(latent_dim=8)
    params = jaxvae.init_params(model, jax.random.key(0))
    settings = EvalSettings(predictors=("rec_error", "kl_grad"))
    written = scans.score_volume(model, params, path, tmp_path / "out", settings=settings)
    ref = nib.load(path)
    assert [p.name for p in written] == ["phantom_lesion_000_t2_rec_error.nii.gz",
                                         "phantom_lesion_000_t2_kl_grad.nii.gz"]
    for p in written:
        img = nib.load(p)
        assert img.shape == ref.shape
        np.testing.assert_allclose(img.affine, ref.affine)
        data = img.get_fdata()
        assert np.all(data[np.asarray(ref.get_fdata()) == 0] == 0)  # zero outside the brain
        assert data.max() > 0
    with pytest.raises(OutputError, match="already exists"):
        scans.score_volume(model, params, path, tmp_path / "out", settings=settings)


def test_score_volume_puts_every_voxel_back_in_place(tmp_path):
    # In-plane 64 x 64, so the resampling to the model's 64 x 64 and back is the identity, and a
    # model with all parameters 0 reconstructs 0, so rec_error is z**2 voxel by voxel (z: the
    # input's clipped z-score). A flip, transposition or shift anywhere on the way shows. The
    # volume is stored with its axial axis first, so the way back must undo a permutation.
    phantom.write_brats(tmp_path / "d", n_healthy=1, n_lesion=0, shape=(64, 64, 24),
                        spacing=(3, 3, 3), modalities=("t2",))
    src = nib.load(tmp_path / "d" / "phantom_healthy_000" / "phantom_healthy_000_t2.nii.gz")
    data = np.asarray(src.dataobj, np.float32).transpose(2, 0, 1)  # (Z, X, Y) on disk
    affine = src.affine[:, [2, 0, 1, 3]]
    path = tmp_path / "zxy.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    model = jaxvae.ConvVAE(latent_dim=8)
    params = jax.tree.map(jnp.zeros_like, jaxvae.init_params(model, jax.random.key(0)))
    [out] = scans.score_volume(model, params, path, tmp_path / "out",
                                  settings=EvalSettings(predictors=("rec_error",)))
    img = nib.load(out)
    got = img.get_fdata()
    assert got.shape == data.shape
    np.testing.assert_array_equal(img.affine, affine)

    brain = data != 0
    values = data[brain].astype(np.float64)
    z = np.zeros(data.shape, np.float32)
    z[brain] = (values - values.mean()) / values.std()
    want = np.square(np.clip(z, -1.5, 1.5))
    # the kept slices: the brain's axial extent minus 1/8 at each end, >= 64 brain pixels
    axial = np.flatnonzero(brain.any(axis=(1, 2)))
    drop = int(0.125 * (axial[-1] - axial[0] + 1))
    kept = np.zeros(len(data), bool)
    kept[axial[0] + drop:axial[-1] - drop + 1] = True
    kept &= brain.sum(axis=(1, 2)) >= 64
    assert 10 <= kept.sum() < len(kept)
    assert not got[~kept].any()
    # z is rounded to float32 from float64 sums taken in another order: a few ulps apart
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6, atol=1e-6 * want.max())
