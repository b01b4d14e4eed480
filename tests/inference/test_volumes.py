"""Pure maths vs the batcher: jit / vmap of the maps and the projection, and the execution
policy's chunks, forms and schedules giving the plain results; the maps of one volume on its
own grid (volume_maps, score_volume with a segmenter) and the volumes of a folder."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import jaxvae
from jaxvae.core.predictors import PREDICTORS
from jaxvae.data import nifti, phantom
from jaxvae.data.datasets import find_brats_cases, load_slices
from jaxvae.inference import segment, volumes
from jaxvae.inference.settings import EvalSettings
from jaxvae.report import scans
from jaxvae.runtime import batching, execution


@pytest.fixture(scope="module")
def setup():
    model = jaxvae.ConvVAE(latent_dim=16)  # conv_impl "lax": the plain form
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jnp.clip(jax.random.normal(jax.random.key(1), (6, 64, 64, 1)) * 0.7, -1.5, 1.5)
    return model, params, x.at[:, :12].set(0.0)  # an exact-zero band, as a background


def _close(got, want, what, rel=1e-5):
    """Equal up to float32 rounding of a different summation order (scaled to the map)."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rel,
                               atol=rel * float(np.abs(want).max()), err_msg=what)


def test_jit_and_vmap_of_anomaly_maps_equal_the_eager_call(setup):
    model, params, x = setup
    kw = dict(beta=0.5, predictors=PREDICTORS, combi_group=3)
    eager = jaxvae.anomaly_maps(model, params, x, **kw)
    jitted = jax.jit(functools.partial(jaxvae.anomaly_maps, model, **kw))(params, x)
    # vmap over two groups of 3 images: combi's groups of 3 are the vmapped batches
    vmapped = jax.vmap(lambda xg: jaxvae.anomaly_maps(model, params, xg, **kw))(
        x.reshape(2, 3, 64, 64, 1))
    for name in PREDICTORS:
        _close(jitted[name], eager[name], f"jit {name}")
        _close(vmapped[name].reshape(6, 64, 64), eager[name], f"vmap {name}")


def test_jit_and_vmap_of_project_equal_the_eager_call(setup):
    model, params, x = setup
    kw = dict(lam=0.2, steps=5, lr=0.03)
    eager = jaxvae.project(model, params, x, **kw)
    jitted = jax.jit(functools.partial(jaxvae.project, model, **kw))(params, x)
    vmapped = jax.vmap(lambda xg: jaxvae.project(model, params, xg, **kw))(
        x.reshape(2, 3, 64, 64, 1))
    for i in (0, 1):
        _close(jitted[i], eager[i], f"jit output {i}")
        _close(vmapped[i].reshape(eager[i].shape), eager[i], f"vmap output {i}")


def test_jitted_projection_is_one_loop_not_a_copy_per_step(setup):
    model, params, x = setup

    def hlo(steps):
        f = jax.jit(functools.partial(jaxvae.project, model, steps=steps))
        return f.lower(params, x).as_text()

    h100, h1 = hlo(100), hlo(1)
    assert "while" in h100
    # one copy of the step's convolutions, however many steps
    assert h100.count("convolution") == h1.count("convolution")


def test_cpu_policy_reproduces_the_plain_maps(setup):
    """Chunks of 4 (combi groups of 2 never split), CPU convolution forms, MC draws per chunk."""
    model, params, x = setup
    policy = dataclasses.replace(execution.CPU, chunk_size=4)
    got = batching.maps(model, params, x, policy=policy, beta=0.5, combi_group=2)
    want = jaxvae.anomaly_maps(model, params, x, beta=0.5, combi_group=2)
    for name in PREDICTORS:
        _close(got[name], want[name], name)
    # combi over the whole batch: one call, not chunks
    got = batching.maps(model, params, x, policy=policy, predictors=["combi"], combi_group=0)
    _close(got["combi"], jaxvae.anomaly_maps(model, params, x, predictors=["combi"],
                                              combi_group=0)["combi"], "combi whole batch")
    # Monte-Carlo z: chunk i draws with fold_in(key, i)
    key = jax.random.key(7)
    got = batching.maps(model, params, x, policy=policy, predictors=["rec_grad"], n_samples=2,
                     key=key)["rec_grad"]
    want = jnp.concatenate([jaxvae.anomaly_maps(model, params, x[s], predictors=["rec_grad"],
                                                n_samples=2, key=jax.random.fold_in(key, i))
                            ["rec_grad"] for i, s in enumerate([slice(0, 4), slice(4, 6)])])
    _close(got, want, "rec_grad with samples")


def test_cpu_policy_reproduces_the_plain_projection(setup):
    """Chunks of 4 images, 3-step unrolled programs in a Python loop (7 = 3 + 3 + 1)."""
    model, params, x = setup
    policy = dataclasses.replace(execution.CPU, chunk_size=4, projection_unroll=3)
    got = batching.project(model, params, x, policy=policy, lam=0.2, steps=7)
    want = jaxvae.project(model, params, x, lam=0.2, steps=7)
    _close(got[0], want[0], "projected images")
    _close(got[1], want[1], "projection map", rel=1e-4)  # 7 Adam steps amplify rounding


def test_no_chunks_policy_runs_one_call_whatever_the_combi_group(setup, monkeypatch):
    model, params, x = setup
    calls = []
    real = batching.anomaly_maps
    monkeypatch.setattr(batching, "anomaly_maps", lambda m, p, xs, **kw: calls.append(
        xs.shape[0]) or real(m, p, xs, **kw))
    batching.maps(model, params, x, policy=execution.ACCELERATOR, combi_group=2)
    assert calls == [6]


def test_batches_pad_by_repeating_the_last_index():
    got = [(idx.tolist(), n) for idx, n in batching.batches(5, 2)]
    assert got == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]
    assert batching.pad_to_multiple(np.arange(5), 4).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_policy_per_backend():
    assert execution.policy_for("cpu") == execution.CPU
    assert execution.policy_for("gpu") == execution.policy_for("tpu") == execution.ACCELERATOR
    assert execution.ACCELERATOR.chunk_size == execution.ACCELERATOR.micro_batch == 0
    assert execution.CPU.sharded().chunk_size == 0 and execution.CPU.sharded().micro_batch == 0
    model = jaxvae.ConvVAE()
    assert execution.CPU.training_model(model).conv_impl == "s2d"
    assert execution.CPU.inference_model(model).conv_impl == "cpu_inference"


# ---- one volume on its own grid: volume_maps, score_volume, the segmenter, find_inputs ----

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
