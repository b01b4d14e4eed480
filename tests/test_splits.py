import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import jaxvae
from jaxvae import score
from jaxvae.data import datasets, phantom, splits
from jaxvae.data.datasets import SliceSet
from jaxvae.errors import ConfigError, OutputError
from jaxvae.evaluate import EvalSettings


def _set(case_lesion):
    n = len(case_lesion) * 2
    lesion = np.zeros((n, 8, 8), bool)
    for i, sick in enumerate(case_lesion):
        lesion[2 * i, 2, 2] = sick  # one of the two slices of a sick case has a lesion
    return SliceSet(np.zeros((n, 8, 8)), np.ones((n, 8, 8)), lesion,
                    np.repeat([f"c{i}" for i in range(len(case_lesion))], 2), np.arange(n))


def test_split_healthy_cohort_trains_and_lesion_cases_test():
    train, test = splits.split(_set([False, False, True, True]))
    assert train.cases == ["c0", "c1"] and test.cases == ["c2", "c3"]
    assert not train.lesion.any()


def test_split_cross_validation_uses_lesion_free_slices_by_case():
    s = _set([True] * 6)
    with pytest.raises(ConfigError, match="--folds 2"):
        splits.split(s)
    seen = set()
    for fold in range(2):
        train, test = splits.split(s, folds=2, fold=fold)
        assert not set(train.cases) & set(test.cases)
        assert not train.lesion.any() and len(train) == len(train.cases)  # one healthy slice each
        seen |= set(test.cases)
    assert seen == set(s.cases)


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
    written = score.score_volume(model, params, path, tmp_path / "out", settings=settings)
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
        score.score_volume(model, params, path, tmp_path / "out", settings=settings)


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
    [out] = score.score_volume(model, params, path, tmp_path / "out",
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
