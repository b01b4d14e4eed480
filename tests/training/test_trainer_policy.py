"""The trainer takes its schedule from the execution policy, and the schedule does not
change what a step computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae.runtime import execution, parallel
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.trainer import init_state, make_train_step, train, train_step_for

CFG = TrainConfig(latent_dim=8, channels=(4, 4, 4, 4), batch_size=16, lr=1e-3, beta=0.5,
                  augment=False)
POLICY = execution.ExecutionPolicy(train_conv="s2d", micro_batch=4)


def step(model, mesh=None, micro_batch=0):
    # the keywords exactly as train_step_for passes them: lru_cache keys on them as given
    return make_train_step(model, lr=1e-3, beta=0.5, augment=None, mesh=mesh,
                           micro_batch=micro_batch)


def test_train_step_for_uses_the_policy_on_one_device():
    model = model_from_config(CFG)
    assert model.conv_impl == "lax"
    s2d = model.clone(conv_impl="s2d")
    assert train_step_for(CFG, policy=POLICY) is step(s2d, micro_batch=4)  # the cached step
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert train_step_for(CFG, mesh, POLICY) is step(s2d, mesh, micro_batch=4)
    default = execution.current()
    assert train_step_for(CFG) is step(model.clone(conv_impl=default.train_conv),
                                       micro_batch=default.micro_batch)


def test_the_schedule_does_not_change_the_step():
    params, opt_state = init_state(CFG)
    batch = jnp.asarray(np.random.default_rng(0).normal(size=(10, 64, 64)), jnp.float32)
    key = jax.random.key(1)
    p_plain, _, m_plain = train_step_for(CFG, policy=execution.PLAIN)(params, opt_state, batch,
                                                                      key)
    p_sched, _, m_sched = train_step_for(CFG, policy=POLICY)(params, opt_state, batch, key)
    for k in ("loss", "rec", "kl"):
        np.testing.assert_allclose(m_sched[k], m_plain[k], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_sched), jax.tree.leaves(p_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_takes_a_policy():
    images = np.random.default_rng(0).normal(size=(16, 64, 64)).astype(np.float32)
    cfg = dataclasses.replace(CFG, epochs=1)
    p_plain, h_plain = train(cfg, images, None, progress=False, policy=execution.PLAIN)
    p_sched, h_sched = train(cfg, images, None, progress=False, policy=POLICY)
    np.testing.assert_allclose(h_sched[0]["loss"], h_plain[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_sched), jax.tree.leaves(p_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
