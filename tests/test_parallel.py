"""Tests of jaxvae.parallel: mesh, sharded training on 2 devices and 2 processes, sharded maps.

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
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxvae import parallel
from jaxvae.config import TrainConfig, model_from_config
from jaxvae.errors import ConfigError
from jaxvae.predictors import anomaly_maps
from jaxvae.train import init_state, train

REPO = Path(__file__).resolve().parents[1]
CFG = TrainConfig(latent_dim=8, channels=(4, 4, 4, 4), batch_size=16, lr=1e-3, epochs=2)


def images(n=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.normal(size=(n, 64, 64)), sigma=(0, 4, 4))
    return (x / x.std()).astype(np.float32)


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


def test_sharded_maps_on_one_device_equal_unsharded():
    model = model_from_config(CFG)
    params, _ = init_state(CFG)
    x = images(3)[..., None]
    want = anomaly_maps(model, params, x, predictors=["rec_error", "combi"])
    got = parallel.sharded_maps(model, params, x, predictors=["rec_error", "combi"])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-9)


TWO_DEVICES = """
    import json, sys
    import jax, numpy as np
    from jaxvae import parallel
    from jaxvae.errors import ConfigError
    from jaxvae.predictors import anomaly_maps
    from jaxvae.projection import project
    from jaxvae.checkpoint import load_run
    from jaxvae.config import TrainConfig, model_from_config
    from jaxvae.train import train
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
    want = {k: np.asarray(v) for k, v in anomaly_maps(model, p4, x).items()}
    got = parallel.sharded_maps(model, p4, x)
    out["maps_devices"] = len(got["rec_error"].sharding.device_set)
    got = {k: np.asarray(v) for k, v in got.items()}
    out["maps_rel_diff"] = {k: float(np.max(np.abs(got[k] - want[k])) / np.max(np.abs(want[k])))
                            for k in want}
    out["maps_shape"] = {k: list(v.shape) for k, v in got.items()}
    want_p = np.asarray(project(model, p4, x, steps=5)[1])
    got_p = np.asarray(parallel.sharded_project(model, p4, x, steps=5)[1])
    out["project_rel_diff"] = float(np.max(np.abs(got_p - want_p)) / np.max(np.abs(want_p)))
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_devices")
    np.save(tmp / "data.npy", images())
    proc = run_child(TWO_DEVICES, [CFG.to_json(), tmp / "data.npy", tmp / "run"],
                     child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    return json.loads(finish(proc).strip().splitlines()[-1])


def test_two_device_training_matches_one_device(two_devices):
    r = two_devices
    np.testing.assert_allclose(r["loss_2dev"], r["loss_1dev"], rtol=1e-5)
    assert r["param_max_abs_diff"] < 1e-4
    assert r["resume_2dev_equal"] and r["load_run_equal"]
    assert "not divisible by the 2 devices" in r["indivisible"]


def test_sharded_maps_over_two_devices_equal_unsharded(two_devices):
    r = two_devices
    assert r["maps_devices"] == 2
    assert set(r["maps_rel_diff"]) == {"rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi"}
    assert all(shape == [7, 64, 64] for shape in r["maps_shape"].values())
    assert max(r["maps_rel_diff"].values()) < 1e-5, r["maps_rel_diff"]
    assert r["project_rel_diff"] < 1e-4


TWO_PROCESSES = """
    import json, sys
    from jaxvae import parallel
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=120)
    import jax, numpy as np
    from jaxvae.config import TrainConfig, model_from_config
    from jaxvae.train import init_state, train
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
