"""Several MR sequences as channels and 128x128 slices on the data side (issue #15): names,
loading (each channel normalised on its own over one brain), refusals (a missing sequence,
volumes not co-registered), the way back at 128, the intensity rows of an evaluation, and
`score_volume` / `volume_maps` / `find_inputs` for a run of several sequences."""

import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

import jaxvae
from jaxvae.base.errors import ConfigError, DataError
from jaxvae.data import nifti, phantom
from jaxvae.data.datasets import (
    SliceSet,
    equalized,
    find_brats_cases,
    find_cases,
    load_slices,
)
from jaxvae.data.preprocess import PreprocessParams, maps_to_volume, preprocess_volume
from jaxvae.data.sequences import check_modality, check_sequences, parse_modalities
from jaxvae.inference import segment, volumes
from jaxvae.inference.calibration import intensity_rows, restrict
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.evaluate import score_dataset
from jaxvae.inference.settings import EvalSettings
from jaxvae.report import scans

SHAPE = (60, 52, 40)  # non-cubic: a transposition on the way back shows in the shapes
CH = (4, 8, 8, 16)  # small widths: fast on CPU
SETTINGS = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad"), smooth_sigma=1.0,
                        batch_size=32, n_boot=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A phantom BraTS folder whose cases hold t2 and flair (one healthy, two lesions)."""
    root = tmp_path_factory.mktemp("ms") / "d"
    phantom.write_brats(root, n_healthy=1, n_lesion=2, shape=SHAPE, spacing=(3, 3, 3))
    return root


@pytest.fixture(scope="module")
def run():
    """(model, params, cfg) of an untrained 2-channel model of a t2,flair run."""
    cfg = jaxvae.TrainConfig(latent_dim=8, channels=CH, in_channels=2,
                             data={"modality": "t2,flair"})
    model = jaxvae.model_from_config(cfg)
    params = jax.jit(jaxvae.init_params, static_argnums=0)(model, jax.random.key(0))
    return model, params, cfg


def _copy(root, tmp_path):
    shutil.copytree(root, tmp_path / "d")
    return tmp_path / "d"


# ---- names --------------------------------------------------------------------------------

def test_parse_modalities_keeps_the_order_and_refuses_unknown_or_repeated_names():
    assert parse_modalities("flair,t2") == ("flair", "t2")
    assert parse_modalities(" T2W, t2f ") == ("t2", "flair")  # BraTS 2023 aliases
    assert parse_modalities(["t1", "t1c"]) == ("t1", "t1ce")
    with pytest.raises(ConfigError, match="unknown sequence 'pd'.*known: .*flair"):
        parse_modalities("flair,pd")
    with pytest.raises(ConfigError, match="'t2w' given twice"):
        parse_modalities("t2,flair,t2w")
    with pytest.raises(ConfigError, match="no sequence"):
        parse_modalities("flair,")


def test_a_multi_sequence_run_is_scored_with_its_sequences_only():
    check_sequences("flair,t2", "flair,t2")
    check_sequences("t2", "flair")  # one sequence: --modality may override (by file name)
    for asked in ("t2", "t2,flair", "flair,t2,t1"):
        with pytest.raises(ConfigError, match="this run reads flair,t2"):
            check_sequences("flair,t2", asked)
    with pytest.raises(ConfigError, match="this run reads t2"):
        check_sequences("t2", "t2,flair")
    check_modality("c_flair.nii.gz", "flair,t2", None)  # any of the run's sequences
    with pytest.raises(ConfigError, match="its name says t1"):
        check_modality("c_t1.nii.gz", "flair,t2", None)


# ---- loading --------------------------------------------------------------------------------

def test_sequences_load_as_channels_each_normalised_on_its_own(root):
    cases = find_brats_cases(root, "t2,flair")
    assert [c.sequences for c in cases] == [("t2", "flair")] * 3
    assert all(c.image_paths[0] == c.image_path and c.image_paths[1].name.endswith("_flair.nii.gz")
               for c in cases)
    both = load_slices(cases)
    assert both.images.shape == (len(both), 64, 64, 2) and both.sequences == ("t2", "flair")
    assert both.brain.shape == both.lesion.shape == both.images.shape[:3]
    # one sequence: (S, H, W) as before, and the same slices as channel 0 (t2's brain)
    t2 = load_slices(find_brats_cases(root, "t2"))
    assert t2.images.shape == both.images.shape[:3] and t2.sequences == ("t2",)
    np.testing.assert_array_equal(both.images[..., 0], t2.images)
    np.testing.assert_array_equal(both.brain, t2.brain)
    np.testing.assert_array_equal(both.lesion, t2.lesion)
    # channel 1 is flair as one volume pre-processed with t2's brain as its brain mask
    case = cases[1]
    t2_vol, flair_vol = nifti.load_volumes(case.image_paths)
    t2_brain = t2_vol.data != 0
    want, *_ = preprocess_volume(flair_vol.data, PreprocessParams(), t2_brain)
    np.testing.assert_array_equal(both.for_cases([case.case_id]).images[..., 1], want)
    # unclipped, each channel's brain pixels have mean ~0 and std ~1 (z-scored at the native
    # grid; resampled to 64x64 they stay close)
    raw = load_slices(cases, PreprocessParams(clip=None))
    for c in range(2):
        v = raw.images[..., c][raw.brain]
        assert abs(v.mean()) < 0.1 and abs(v.std() - 1) < 0.15, (c, v.mean(), v.std())


def test_each_channel_is_normalised_on_its_own():
    # the second sequence a thousand times brighter and shifted: the same channel after
    # pre-processing, which a joint normalisation of the channels would not give
    rng = np.random.default_rng(0)
    x = np.zeros((40, 36, 30))
    x[5:35, 4:32, 3:27] = rng.normal(3, 1, (30, 28, 24))
    brain = x != 0
    other = np.where(brain, 1000 * x + 5, 0)
    params = PreprocessParams(size=32, clip=None, min_brain_pixels=8)
    images, brain_s, _, geom = preprocess_volume(np.stack([x, other], -1), params,
                                                 name=["a.nii", "b.nii"])
    one, brain_1, _, geom_1 = preprocess_volume(x, params)
    assert images.shape == (*one.shape, 2) and geom == geom_1
    np.testing.assert_array_equal(brain_s, brain_1)
    np.testing.assert_array_equal(images[..., 0], one)
    np.testing.assert_allclose(images[..., 1], one, atol=1e-5)
    with pytest.raises(DataError, match="b.nii: constant intensity inside the brain"):
        preprocess_volume(np.stack([x, np.where(brain, 7.0, 0)], -1), params,
                          name=["a.nii", "b.nii"])


def test_slice_sets_keep_their_sequences(root):
    both = load_slices(find_brats_cases(root, "flair,t2"))
    assert both.sequences == ("flair", "t2")
    part = both.for_cases(both.cases[:1])
    assert part.sequences == ("flair", "t2") and part.images.shape[1:] == (64, 64, 2)
    assert both.lesion_free().sequences == ("flair", "t2")
    again = SliceSet.concat([part, both.for_cases(both.cases[1:])])
    np.testing.assert_array_equal(again.images, both.images)
    assert again.sequences == ("flair", "t2")
    t2 = load_slices(find_brats_cases(root, "t2"))
    with pytest.raises(ValueError, match="different sequences"):
        SliceSet.concat([t2, part])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        SliceSet(both.images, both.brain, both.lesion, both.case_ids, both.slice_index,
                 sequences=("flair",))  # one name for two channels


def test_histogram_equalisation_takes_each_channel_on_its_own():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 2)).astype(np.float32)
    brain = rng.random((4, 8, 8)) > 0.3
    ids = ["a", "a", "b", "b"]

    def slices(x):
        return SliceSet(x, brain, np.zeros_like(brain), ids, np.arange(4))

    both = equalized(slices(images))
    assert both.shape == images.shape
    for c in range(2):
        np.testing.assert_array_equal(both[..., c], equalized(slices(images[..., c])))


def test_the_cache_keys_on_the_sequences_and_their_order(root, tmp_path):
    cases = find_brats_cases(root, "t2,flair")[:1]
    swapped = find_brats_cases(root, "flair,t2")[:1]
    a = load_slices(cases, cache_dir=tmp_path)
    b = load_slices(swapped, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    np.testing.assert_array_equal(a.images[..., ::-1], b.images)
    hit = load_slices(cases, cache_dir=tmp_path)  # from the cache
    np.testing.assert_array_equal(hit.images, a.images)
    assert hit.sequences == ("t2", "flair")


def test_a_case_missing_a_sequence_is_refused_by_name(root, tmp_path):
    data = _copy(root, tmp_path)
    case = sorted(p for p in data.iterdir() if p.is_dir())[1]
    (case / f"{case.name}_flair.nii.gz").unlink()
    with pytest.raises(DataError, match=f"{case.name}: no flair image"):
        find_brats_cases(data, "t2,flair")
    assert len(find_brats_cases(data, "t2")) == 3  # the one sequence it has is fine


@pytest.mark.parametrize("change", ["affine", "shape"])
def test_volumes_not_co_registered_are_refused_naming_both_files(root, tmp_path, change):
    data = _copy(root, tmp_path)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    path = case / f"{case.name}_flair.nii.gz"
    img = nib.load(path)
    arr, affine = np.asarray(img.dataobj), img.affine.copy()
    if change == "affine":
        affine[0, 3] += 3.0  # one voxel off
    else:
        arr = arr[:-1]
    path.unlink()
    nib.save(nib.Nifti1Image(arr, affine), path)
    cases = [c for c in find_brats_cases(data, "t2,flair") if c.case_id == case.name]
    what = "affines differ" if change == "affine" else "shapes"
    with pytest.raises(DataError, match=f"{case.name}_flair.nii.gz vs .*{case.name}_t2"
                                        f".nii.gz: {what}"):
        load_slices(cases)


def test_several_sequences_need_the_brats_layout(root, tmp_path):
    one = root / "phantom_healthy_000" / "phantom_healthy_000_t2.nii.gz"
    with pytest.raises(ConfigError, match="BraTS layout"):
        find_cases(one, "t2,flair")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(one, flat / "a.nii.gz")
    with pytest.raises(ConfigError, match="BraTS layout"):
        find_cases(flat, "t2,flair")
    cases, desc = find_cases(root, "T2,T2F")
    assert desc["modality"] == "t2,flair" and len(cases) == 3
    with pytest.raises(ConfigError, match="unknown sequence"):
        find_cases(root, "t2,dwi")


# ---- 128x128 --------------------------------------------------------------------------------

def test_128_slices_and_the_way_back(root):
    cases = find_brats_cases(root, "t2,flair")
    big = load_slices(cases, PreprocessParams(size=128))
    assert big.images.shape[1:] == (128, 128, 2)
    geom = big.geometries[cases[0].case_id]
    assert geom.size == 128 and geom.native_shape == SHAPE
    part = big.for_cases([cases[0].case_id])
    back = maps_to_volume(part.images[..., 0], geom)
    assert back.shape == SHAPE
    # the way back of the pre-processed image lands on the image: correlated in the brain
    vol = nifti.load_volume(cases[0].image_path).data
    kept = np.zeros(SHAPE, bool)
    kept[:, :, list(geom.slices)] = vol[:, :, list(geom.slices)] != 0
    assert np.corrcoef(back[kept], vol[kept])[0, 1] > 0.9


def test_128_maps_go_back_onto_the_real_volume(shared_data, tmp_path):
    path = shared_data / "brats2021_t2" / "BraTS2021_00006" / "BraTS2021_00006_t2.nii.gz"
    volume = nifti.load_volume(path)
    images, brain, _, geom = preprocess_volume(volume.data, PreprocessParams(size=128))
    assert images.shape[1:] == (128, 128) and brain.shape == images.shape
    native = volume.to_native(maps_to_volume(images, geom, volume.data != 0))
    out = nifti.save_volume(tmp_path / "m.nii.gz", native, volume.affine)
    ref, got = nib.load(path), nib.load(out)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
    # the map (the normalised image) lies on the image: where it is zero, so is the map
    np.testing.assert_array_equal(np.asarray(got.dataobj)[np.asarray(ref.dataobj) == 0], 0)


# ---- evaluation -----------------------------------------------------------------------------

def test_evaluation_of_two_channel_slices(root, run):
    model, params, cfg = run
    slices = load_slices(find_brats_cases(root, "t2,flair"))
    val, test = slices.for_cases(slices.cases[1:2]), slices.for_cases(slices.cases[::2])
    maps = compute_maps(model, params, test.images, settings=SETTINGS)
    assert all(m.shape == test.images.shape[:3] for m in maps.values())
    # the batcher feeds the (S, H, W, C) images as they are: the plain call's maps
    direct = jaxvae.anomaly_maps(model, params, test.images[:5], predictors=("rec_error",))
    np.testing.assert_allclose(maps["rec_error"][:5], np.asarray(direct["rec_error"]),
                               rtol=1e-5, atol=1e-6)
    keep = [0, len(test) - 1]
    results, kept = score_dataset(model, params, test, val=val, settings=SETTINGS, keep=keep)
    rows = results["predictors"]
    assert {"intensity", "intensity_t2", "intensity_flair", "ensemble+intensity"} <= set(rows)
    want = restrict({"intensity": test.images[keep].mean(-1),  # rows: brain-restricted
                     "intensity_t2": test.images[keep][..., 0],
                     "intensity_flair": test.images[keep][..., 1]}, test.brain[keep])
    for name, m in want.items():
        np.testing.assert_array_equal(kept[name], m, err_msg=name)
    assert kept["rec_error"].shape == (2, 64, 64)
    assert set(intensity_rows(test.images[:1])) == {"intensity", "intensity_c0", "intensity_c1"}
    # one sequence: one intensity row, the image itself, as before
    t2 = load_slices(find_brats_cases(root, "t2"))
    assert list(intensity_rows(t2.images, t2.sequences)) == ["intensity"]


# ---- scoring new scans with a run of several sequences ------------------------------------

def test_find_inputs_gives_each_case_all_its_sequences(root):
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    want = [(root / i / f"{i}_t2.nii.gz", root / i / f"{i}_flair.nii.gz") for i in ids]
    assert volumes.find_inputs(root, trained="t2,flair") == want
    assert volumes.find_inputs(root / ids[0], modality="t2,flair", trained="t2,flair") == want[:1]
    with pytest.raises(ConfigError, match="this run reads t2,flair: give a case folder"):
        volumes.find_inputs(want[0][0], trained="t2,flair")
    with pytest.raises(ConfigError, match="this run reads t2,flair"):
        volumes.find_inputs(root, modality="t2", trained="t2,flair")


def test_score_volume_of_a_two_sequence_case(root, run, tmp_path):
    model, params, cfg = run
    case = find_brats_cases(root, "t2,flair")[2]
    folder = case.image_path.parent
    seg = segment.fit(model, params, load_slices([case]), beta=cfg.beta, settings=SETTINGS)
    written = scans.score_volume(model, params, folder, tmp_path, beta=cfg.beta,
                                 settings=SETTINGS, modality="t2,flair", segmenter=seg)
    names = [*SETTINGS.predictors, "prob", "mask"]
    assert [p.name for p in written] == [f"{case.case_id}_{k}.nii.gz" for k in names]
    ref = nib.load(case.image_path)
    for p in written:
        img = nib.load(p)
        assert img.shape == ref.shape
        np.testing.assert_array_equal(img.affine, ref.affine)
    # the same maps from the pair of paths, and from volume_maps with the run's sequences
    again = scans.score_volume(model, params, case.image_paths, tmp_path / "b", beta=cfg.beta,
                               settings=SETTINGS, modality="t2,flair", segmenter=seg)
    maps = volumes.volume_maps(run, folder, settings=SETTINGS, segmenter=seg)
    for a, b, name in zip(written, again, names, strict=True):
        np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj),
                                      np.asarray(nib.load(b).dataobj))
        np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), maps[name])
    assert np.asarray(nib.load(written[0]).dataobj)[np.asarray(ref.dataobj) == 0].max() == 0
    # refused: one file, the sequences swapped, another sequence than the run's
    with pytest.raises(ConfigError, match="reads 2 sequence"):
        scans.score_volume(model, params, case.image_path, tmp_path / "c", settings=SETTINGS)
    with pytest.raises(ConfigError, match="channel 0 of this run is t2"):
        scans.score_volume(model, params, case.image_paths[::-1], tmp_path / "c",
                           settings=SETTINGS, modality="t2,flair")
    with pytest.raises(ConfigError, match="this run reads t2,flair"):
        volumes.volume_maps(run, folder, settings=SETTINGS, modality="flair")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("size", [64, 128])
def test_score_maps_of_the_real_case_at_both_sizes(shared_data, tmp_path, size):
    folder = shared_data / "brats2021_t2" / "BraTS2021_00006"
    model = jaxvae.ConvVAE(latent_dim=8, channels=CH, image_size=size, in_channels=2)
    params = jax.jit(jaxvae.init_params, static_argnums=0)(model, jax.random.key(0))
    settings = EvalSettings(predictors=("rec_error",), batch_size=64)
    [out] = scans.score_volume(model, params, folder, tmp_path, settings=settings,
                               modality="flair,t2", preprocess=PreprocessParams(size=size))
    ref = nib.load(folder / "BraTS2021_00006_flair.nii.gz")
    got = nib.load(out)
    assert out.name == "BraTS2021_00006_rec_error.nii.gz"
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.affine, ref.affine)
    assert np.asarray(got.dataobj).max() > 0
    with pytest.raises(ConfigError, match=f"reads {size}x{size} slices"):
        scans.score_volume(model, params, folder, tmp_path / "x", settings=settings,
                           modality="flair,t2", preprocess=PreprocessParams(size=192 - size))
