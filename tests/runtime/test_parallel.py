"""Tests of jaxvae.runtime.parallel: mesh, sharded training on 2 devices and 2 processes,
sharded maps.

Several CPU devices need XLA_FLAGS set before jax is imported, and several processes need
jax.distributed, so those checks run in child processes that write their results as JSON.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage as ndi

from jaxvae.base.errors import ConfigError
from jaxvae.core import losses
from jaxvae.core.model import decode, encode
from jaxvae.core.projection import energy
from jaxvae.runtime import batching, parallel
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.trainer import init_state, train

REPO = Path(__file__).resolve().parents[2]
CFG = TrainConfig(latent_dim=8, channels=(4, 4, 4, 4), batch_size=16, lr=1e-3, epochs=2)


def images(n=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.normal(size=(n, 64, 64)), sigma=(0, 4, 4))
    return (x / x.std()).astype(np.float32)


def reference_maps(model, params, x, beta=1.0, sigma=3.0) -> dict:
    """The five maps the slow obvious way, independent of jaxvae.core.predictors: one jax.grad per
    loss, scipy's Gaussian (radius ceil(sigma), zero outside), combi's min-max over the batch."""
    def rec(x):
        return 0.5 * jnp.sum((x - decode(model, params, encode(model, params, x)[0])) ** 2)

    def kl(x):
        return jnp.sum(losses.kl_divergence(*encode(model, params, x)))

    def blur(a):
        return ndi.gaussian_filter(np.asarray(a, np.float64), (0, sigma, sigma), mode="constant",
                                   truncate=np.ceil(sigma) / sigma)

    x = jnp.asarray(x)
    sq = np.asarray((x - decode(model, params, encode(model, params, x)[0])) ** 2)[..., 0]
    g_rec, g_kl = (np.asarray(jax.grad(f)(x))[..., 0] for f in (rec, kl))
    k = np.abs(g_kl)
    return {"rec_error": sq, "rec_grad": blur(np.abs(g_rec)), "kl_grad": blur(k),
            "elbo_grad": blur(np.abs(g_rec + beta * g_kl)),
            "combi": blur((k - k.min()) / (k.max() - k.min())) * (0.5 * sq + losses.HALF_LOG_2PI)}


def assert_maps_match_reference(got, want):
    """Float32 maps against the reference: rtol for the bulk, an atol scaled to each map for
    entries near zero: 1e-4 of its maximum for the input gradients (sums of many products
    whose rounding follows the size of the terms: ~1e-6 of the maximum), 1e-5 otherwise."""
    assert set(got) == set(want)
    for name, w in want.items():
        scale = 1e-4 if name.endswith("_grad") else 1e-5
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=scale * np.abs(w).max(),
                                   err_msg=name)


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_child(code: str, args, env, timeout=300) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child timed out: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


def test_single_device_mesh_shards_and_replicates():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    xs = parallel.shard_batch(x, mesh)
    np.testing.assert_array_equal(xs, x)
    assert xs.sharding == parallel.batch_sharding(mesh)
    assert parallel.process_rows(mesh, 4) == slice(0, 4)
    tree = parallel.replicate({"a": np.ones(3)}, mesh)
    assert tree["a"].sharding.is_fully_replicated


def test_batch_size_must_divide_over_devices():
    parallel.check_batch_size(64, 4)
    with pytest.raises(ConfigError, match="not divisible by the 3 devices"):
        parallel.check_batch_size(64, 3)


def test_sharded_maps_on_one_device_equal_the_reference():
    model = model_from_config(CFG)
    params, _ = init_state(CFG)
    x = images(3)[..., None]
    got = batching.sharded_maps(model, params, x, beta=0.7)
    assert all(v.shape == (3, 64, 64) for v in got.values())
    assert_maps_match_reference(got, reference_maps(model, params, x, beta=0.7))


TWO_DEVICES = """
    import json, sys
    import jax, numpy as np
    from jaxvae.runtime import parallel
    from jaxvae.runtime import batching
    from jaxvae.base.errors import ConfigError
    from jaxvae.training.checkpoint import load_run
    from jaxvae.training.config import TrainConfig, model_from_config
    from jaxvae.training.trainer import train
    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    data, run_dir = np.load(sys.argv[2]), sys.argv[3]
    assert jax.device_count() == 2, jax.devices()
    out = {}
    one = parallel.make_mesh(jax.devices()[:1])
    p1, h1 = train(cfg, data, None, progress=False, mesh=one)
    p2, h2 = train(cfg, data, None, progress=False)  # default mesh: both devices
    out["loss_1dev"] = [h["loss"] for h in h1]
    out["loss_2dev"] = [h["loss"] for h in h2]
    out["param_max_abs_diff"] = max(float(np.max(np.abs(a - b)))
                                    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    # checkpoints of replicated 2-device arrays: resume on 2 devices, load on one
    train(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 1}), data, run_dir, progress=False)
    p3, _ = train(cfg, data, run_dir, resume=True, progress=False)
    out["resume_2dev_equal"] = all(np.array_equal(a, b) for a, b in
                                   zip(jax.tree.leaves(p2), jax.tree.leaves(p3)))
    _, p4, _ = load_run(run_dir)
    out["load_run_equal"] = all(np.array_equal(a, b) for a, b in
                                zip(jax.tree.leaves(p2), jax.tree.leaves(p4)))
    try:
        train(TrainConfig.from_dict({**cfg.to_dict(), "batch_size": 15}), data, None,
              progress=False)
    except ConfigError as e:
        out["indivisible"] = str(e)
    model = model_from_config(cfg)
    x = data[:7, ..., None]  # 7 images: padded to 8 for 2 devices
    got = batching.sharded_maps(model, p4, x)
    out["maps_devices"] = len(got["rec_error"].sharding.device_set)
    x_p, m_p = batching.sharded_project(model, p4, x, steps=5)
    out["project_devices"] = len(m_p.sharding.device_set)
    # the parent compares them with references computed on one device
    np.savez(sys.argv[4], **{k: np.asarray(v) for k, v in got.items()},
             proj_x=np.asarray(x_p), proj_map=np.asarray(m_p))
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_devices")
    np.save(tmp / "data.npy", images())
    proc = run_child(TWO_DEVICES, [CFG.to_json(), tmp / "data.npy", tmp / "run", tmp / "maps.npz"],
                     child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    out = json.loads(finish(proc).strip().splitlines()[-1])
    with np.load(tmp / "maps.npz") as f:
        out["maps"] = dict(f)
    out["run_dir"], out["images"] = tmp / "run", images()[:7, ..., None]
    return out


def test_two_device_training_matches_one_device(two_devices):
    r = two_devices
    # the devices sum the batch in another order: ~1e-7 relative on the losses (measured);
    # each of the 6 Adam steps moves a parameter by ~lr = 1e-3: 1e-4 is a tenth of a step
    np.testing.assert_allclose(r["loss_2dev"], r["loss_1dev"], rtol=1e-5)
    assert r["param_max_abs_diff"] < 1e-4
    assert r["resume_2dev_equal"] and r["load_run_equal"]
    assert "not divisible by the 2 devices" in r["indivisible"]


def test_sharded_maps_over_two_devices_equal_the_reference(two_devices):
    # 7 images over 2 devices: padded to 8 and cut back; the maps must be those of the 7 real
    # images, in order (repeating the last image leaves combi's batch min-max unchanged)
    r = two_devices
    assert r["maps_devices"] == 2 and r["project_devices"] == 2
    _, params, _ = load_run(r["run_dir"])
    model, x = model_from_config(CFG), r["images"]
    got = {k: v for k, v in r["maps"].items() if not k.startswith("proj_")}
    assert all(v.shape == (7, 64, 64) for v in got.values())
    assert_maps_match_reference(got, reference_maps(model, params, x))
    # projection: 5 plain optax Adam steps on the 7 images (lam 1, lr 0.03, the defaults)
    x0 = jnp.asarray(x)
    opt, grad_e = optax.adam(0.03), jax.grad(lambda v: jnp.sum(energy(model, params, v, x0, 1.0)))
    want, state = x0, opt.init(x0)
    for _ in range(5):
        updates, state = opt.update(grad_e(want), state, want)
        want = optax.apply_updates(want, updates)
    # Adam moves a pixel by up to lr per step; rounding shows where the gradient nearly cancels
    np.testing.assert_allclose(r["maps"]["proj_x"], want, rtol=0, atol=1e-2 * 0.03)
    rec = decode(model, params, encode(model, params, want)[0])
    assert_maps_match_reference({"proj": r["maps"]["proj_map"]},
                                {"proj": np.asarray((x0 - rec) ** 2)[..., 0]})


TWO_PROCESSES = """
    import json, sys
    from jaxvae.runtime import parallel
    from jaxvae.runtime import batching
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=120)
    import jax, numpy as np
    from jaxvae.training.config import TrainConfig, model_from_config
    from jaxvae.training.trainer import init_state, train
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
    cfg = TrainConfig.from_dict(json.loads(sys.argv[3]))
    data = np.load(sys.argv[4], mmap_mode="r")
    params, hist = train(cfg, data, sys.argv[5], progress=False)
    if pid == 0:
        np.savez(sys.argv[6], *[np.asarray(a) for a in jax.tree.leaves(params)])
        print(json.dumps([h["loss"] for h in hist]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_loopback_match_single_process(tmp_path):
    data = images()
    np.save(tmp_path / "data.npy", data)
    port = free_port()
    procs = [run_child(TWO_PROCESSES, [pid, port, CFG.to_json(), tmp_path / "data.npy",
                                       tmp_path / "run", tmp_path / "params.npz"], child_env())
             for pid in (0, 1)]
    outs = [finish(p) for p in procs]
    losses = json.loads(outs[0].strip().splitlines()[-1])
    ref_params, ref_hist = train(CFG, data, None, progress=False)
    np.testing.assert_allclose(losses, [h["loss"] for h in ref_hist], rtol=1e-5)
    with np.load(tmp_path / "params.npz") as got:
        for i, ref in enumerate(jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(got[f"arr_{i}"], ref, atol=1e-4)
    # one run directory, written once: config, one line per epoch, the final checkpoint
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "6").is_dir()
