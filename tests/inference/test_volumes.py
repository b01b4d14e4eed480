"""Tests of jaxvae.inference.volumes and jaxvae.report.scans: the maps of one volume on its own
grid (volume_maps, score_volume with a segmenter) and the volumes of a folder."""

import dataclasses

import jax
import nibabel as nib
import numpy as np
import pytest

import jaxvae
from jaxvae.data import nifti, phantom
from jaxvae.data.datasets import find_brats_cases, load_slices
from jaxvae.inference import segment, volumes
from jaxvae.inference.settings import EvalSettings
from jaxvae.report import scans

SEG_SETTINGS = EvalSettings(predictors=("rec_error",), smooth_sigma=1.0, batch_size=32)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(run tuple, segmenter, a lesion volume's path): an untrained model, its segmenter."""
    root = tmp_path_factory.mktemp("vol") / "d"
    # a non-cubic grid, so that a transposition on the way back shows in the shapes
    phantom.write_brats(root, n_healthy=0, n_lesion=2, shape=(60, 52, 40), spacing=(3, 3, 3),
                        modalities=("t2",))
    cases = find_brats_cases(root, "t2")
    cfg = jaxvae.TrainConfig(latent_dim=8, channels=(4, 8, 8, 16))  # small: fast
    model = jaxvae.model_from_config(cfg)
    # jitted: an eager Flax init compiles each small op on its own (tens of seconds on CPU)
    params = jax.jit(jaxvae.init_params, static_argnums=0)(model, jax.random.key(0))
    seg = segment.fit(model, params, load_slices(cases), beta=cfg.beta, settings=SEG_SETTINGS)
    return (model, params, cfg), segment.Segmenter.from_json(seg), cases[0].image_path


def test_volume_maps_are_what_score_volume_writes(scored, tmp_path):
    run, seg, path = scored
    model, params, cfg = run
    maps = volumes.volume_maps(run, path, settings=SEG_SETTINGS, segmenter=seg)
    ref = nib.load(path)
    assert list(maps) == ["rec_error", "prob", "mask"]  # the ensemble's other maps: not asked
    for name, m in maps.items():
        assert m.shape == ref.shape, name
    assert maps["prob"].dtype == np.float32 and maps["mask"].dtype == np.uint8
    prob = maps["prob"]
    assert 0 <= prob.min() and prob.max() <= 1 and prob.max() > 0
    assert np.all(prob[np.asarray(ref.dataobj) == 0] == 0)  # nothing outside the brain
    # the mask is the written probability at the segmenter's threshold, on the input's grid
    np.testing.assert_array_equal(maps["mask"], (prob >= np.float32(seg.threshold)) & (prob > 0))

    written = scans.score_volume(model, params, path, tmp_path, beta=cfg.beta,
                                 settings=SEG_SETTINGS, segmenter=seg)
    stem = nifti.volume_stem(path)
    assert [p.name for p in written] == [f"{stem}_{k}.nii.gz" for k in maps]
    for name, p in zip(maps, written, strict=True):
        img = nib.load(p)
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert img.get_data_dtype() == maps[name].dtype
        np.testing.assert_array_equal(np.asarray(img.dataobj), maps[name])

    # a nibabel image (read from a file, or only in memory) is the same input as its path
    in_memory = nib.Nifti1Image(np.asarray(ref.dataobj), ref.affine)
    for image in (ref, in_memory):
        got = volumes.volume_maps(run, image, settings=SEG_SETTINGS, segmenter=seg)
        for name in maps:
            np.testing.assert_array_equal(got[name], maps[name], err_msg=name)
    # without a segmenter: the maps only ("auto" with a tuple: there is no run directory)
    assert list(volumes.volume_maps(run, path, settings=SEG_SETTINGS)) == ["rec_error"]


def test_other_map_settings_than_the_segmenters_are_refused_before_any_work(scored, tmp_path):
    run, seg, _ = scored
    model, params, _ = run
    other = dataclasses.replace(SEG_SETTINGS, smooth_sigma=3.0)
    missing = tmp_path / "not_read.nii.gz"  # refused before the input is even read
    with pytest.raises(jaxvae.ConfigError, match="fitted on maps with smooth_sigma=1.0"):
        scans.score_volume(model, params, missing, tmp_path / "out", settings=other,
                           segmenter=seg)
    with pytest.raises(jaxvae.ConfigError, match="smooth_sigma=1.0"):
        volumes.volume_maps(run, missing, settings=other, segmenter=seg)
    assert not (tmp_path / "out").exists()
    # no settings given: the segmenter's map settings
    assert volumes.settings_for(None, seg).smooth_sigma == 1.0


def test_in_memory_images_are_checked_like_files():
    data = np.ones((32, 32, 8), np.float32)
    data[0, 0, 0] = np.nan
    with pytest.raises(jaxvae.DataError, match="in-memory Nifti1Image.*NaN"):
        nifti.load_volume(nib.Nifti1Image(data, np.eye(4)))
    with pytest.raises(jaxvae.DataError, match="not a NIfTI image"):
        nifti.load_volume(nib.MGHImage(np.ones((32, 32, 8), np.float32), np.eye(4)))


def test_find_inputs_in_a_brats_folder(tmp_path):
    root = tmp_path / "brats"
    phantom.write_brats(root, n_healthy=1, n_lesion=1, shape=(32, 32, 16), spacing=(6, 6, 6),
                        modalities=("t2", "flair"))
    ids = ["phantom_healthy_000", "phantom_lesion_000"]
    assert volumes.find_inputs(root, trained="t2") == [root / i / f"{i}_t2.nii.gz" for i in ids]
    assert volumes.find_inputs(root, modality="flair", trained="t2") == [
        root / i / f"{i}_flair.nii.gz" for i in ids]
    # one case folder: its image of the sequence, not its _seg nor its other sequence
    case = root / ids[1]
    assert volumes.find_inputs(case, trained="t2") == [case / f"{ids[1]}_t2.nii.gz"]
    with pytest.raises(jaxvae.ConfigError, match="modality"):
        volumes.find_inputs(root)  # which sequence of the cases?
    with pytest.raises(jaxvae.ConfigError, match="run was trained on t2"):
        volumes.find_inputs(case / f"{ids[1]}_flair.nii.gz", trained="t2")


def test_find_inputs_in_a_flat_folder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    names = ["b.nii.gz", "a.nii", "a_seg.nii.gz", "a_mask.nii.gz", "a_brainmask.nii",
             "a_prob.nii.gz", "a_rec_error.nii.gz", ".a.nii.gz.tmp.nii.gz", "notes.txt"]
    for n in names:
        (flat / n).write_bytes(b"")  # find_inputs reads no voxel
    (flat / "sub").mkdir()
    assert volumes.find_inputs(flat, trained="t2") == [flat / "a.nii", flat / "b.nii.gz"]
    (flat / "c_flair.nii.gz").write_bytes(b"")
    with pytest.raises(jaxvae.ConfigError, match="c_flair.nii.gz: its name says flair"):
        volumes.find_inputs(flat, trained="t2")
    assert flat / "c_flair.nii.gz" in volumes.find_inputs(flat, modality="flair", trained="t2")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x_seg.nii.gz").write_bytes(b"")
    with pytest.raises(jaxvae.ConfigError, match=f"{empty}: no .nii"):
        volumes.find_inputs(empty, trained="t2")
    with pytest.raises(jaxvae.ConfigError, match="no such file or folder"):
        volumes.find_inputs(tmp_path / "missing")
