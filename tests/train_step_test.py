"""Properties of one train step that a broken trainer would violate (tiny U-Net, 4 CPU devices).

Each test states a closed form the step must satisfy: fresh t and noise every step, the EMA
formula, the clipped first Adam moment, the importance-sampling history, the all-finite flag
over the *updated* params, and the warm-up at `warmup_steps=0`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax.config import factories
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import train_step as train_step_lib

from helpers import tiny_config


def _setup(**overrides):
  config = tiny_config(**overrides)
  mesh = mesh_lib.make_mesh()
  model = factories.create_model(config)
  tables = factories.tables_from_config(config)
  state = train_state_lib.create_train_state(config, model, mesh)
  step = train_step_lib.from_config(config, model, factories.loss_fn_from_config(config, tables),
                                    mesh)
  image = next(input_pipeline.create_train_iterator(config))["image"]
  return config, mesh, state, step, image


def _batch(mesh, image):
  flags = np.zeros(jax.device_count(), np.bool_)
  return mesh_lib.global_batch(mesh, {"image": image, "preempt": flags})


def _named(tree, name):
  """The leaves of `tree` under any attribute or key called `name` (e.g. Adam's 'mu')."""
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if f".{name}" in jax.tree_util.keystr(path) or f"'{name}'" in jax.tree_util.keystr(path)]


def test_each_step_draws_new_timesteps_and_noise():
  # lr = 0 keeps the params fixed, so on one batch the loss changes only through t and noise.
  _, mesh, state, step, image = _setup(**{"optim.lr": 0.0, "optim.warmup_steps": 0})
  before = jax.device_get(state.params)
  state, m1 = step(state, _batch(mesh, image))
  state, m2 = step(state, _batch(mesh, image))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
  assert float(m1["loss"]) != float(m2["loss"])


def test_ema_after_one_step_is_decay_times_init_plus_rest_times_params():
  decay = 0.9
  _, mesh, state, step, image = _setup(**{"training.ema_decay": decay, "optim.lr": 1e-2,
                                          "optim.warmup_steps": 0})
  init = jax.device_get(state.params)
  state, _ = step(state, _batch(mesh, image))
  params, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
  moved = max(float(np.max(np.abs(p - i))) for p, i in
              zip(jax.tree.leaves(params), jax.tree.leaves(init)))
  assert moved > 1e-3  # otherwise an inverted formula would agree too
  for i, p, e in zip(jax.tree.leaves(init), jax.tree.leaves(params), jax.tree.leaves(ema)):
    np.testing.assert_allclose(e, decay * i + (1 - decay) * p, rtol=1e-6, atol=1e-7)


def test_huge_gradient_first_adam_moment_is_bounded_by_the_clip_norm():
  # The trainer's own optimiser and state, fed a gradient of global norm 1e6.
  clip, b1 = 1.0, 0.9
  config = tiny_config(**{"optim.grad_clip": clip, "optim.b1": b1})
  state = train_state_lib.create_train_state(config, factories.create_model(config),
                                             mesh_lib.make_mesh())

  @jax.jit  # one program, not one per leaf and op
  def first_update(params, opt_state):
    grads = jax.tree.map(jnp.ones_like, params)
    grads = jax.tree.map(lambda g: g * 1e6 / optax.tree.norm(grads), grads)
    return state.tx.update(grads, opt_state, params)[1]

  opt_state = first_update(state.params, state.opt_state)
  mu = _named(opt_state, "mu")
  assert mu
  # After one step mu = (1 - b1) * clipped gradient, whose global norm is at most `clip`.
  # (Two float32 global norms, each rounding by a few 1e-5.)
  np.testing.assert_allclose(float(optax.tree.norm(mu)), (1 - b1) * clip, rtol=1e-4)


def test_importance_sampled_steps_fill_the_history_with_the_gathered_losses():
  config, mesh, state, step, image = _setup(**{"diffusion.t_sampling": "importance",
                                               "optim.lr": 0.0, "optim.warmup_steps": 0})
  batch, k = config.training.batch_size, 2
  losses_seen = []
  for _ in range(k):
    state, metrics = step(state, _batch(mesh, image))
    losses_seen.append(float(metrics["loss"]))
  history, counts = (np.asarray(x) for x in jax.device_get((state.importance.history,
                                                            state.importance.counts)))
  # Every example of every step is one entry of the history (no t is drawn 10 times here).
  assert counts.max() < history.shape[1]
  assert counts.sum() == k * batch
  filled = np.arange(history.shape[1])[None, :] < counts[:, None]
  assert np.all(history[filled] > 0) and np.all(history[~filled] == 0)
  # Until the history is full p(t) is uniform, so the weights are 1 and the step's loss is the
  # plain mean of its examples' losses, the very values the history holds.
  np.testing.assert_allclose(history.sum(), batch * sum(losses_seen), rtol=1e-5)


def test_finite_flag_checks_the_updated_params():
  # lr = 1e39 overflows the params although the loss and gradient (from the old params) are finite.
  _, mesh, state, step, image = _setup(**{"optim.lr": 1e39, "optim.warmup_steps": 0})
  state, metrics = step(state, _batch(mesh, image))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(metrics["finite"]) == 0


def test_skip_nonfinite_updates_keeps_the_old_state():
  _, mesh, state, step, image = _setup(**{"optim.lr": 1e39, "optim.warmup_steps": 0,
                                          "training.skip_nonfinite_updates": True})
  before = jax.device_get(state)
  state, metrics = step(state, _batch(mesh, image))
  after = jax.device_get(state)
  assert int(metrics["skipped"]) == 1 and int(metrics["finite"]) == 1
  assert int(after.step) == int(before.step) + 1
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("warmup", [0, 4])
def test_learning_rate_warmup(warmup):
  config = tiny_config(**{"optim.warmup_steps": warmup, "optim.lr": 1e-3})
  schedule = train_state_lib.learning_rate_schedule(config.optim)
  expected = [1e-3 * min(1.0, s / warmup) if warmup else 1e-3 for s in range(6)]
  np.testing.assert_allclose([float(schedule(s)) for s in range(6)], expected, rtol=1e-6)


@pytest.mark.parametrize("parameterization,flow_t", [
    ("ddpm", "uniform"), ("edm", "uniform"), ("flow", "uniform"), ("flow", "logit_normal")])
def test_gradient_norm_and_update_do_not_depend_on_the_device_count(parameterization, flow_t):
  """Under shard_map's default vma checking the gradient of the global mean loss is the same on
  1 and 4 devices (a pmean on top of the implicit psum would scale it by the device count);
  EDM's sigma and flow matching's t are drawn per example like DDPM's t, so the same holds. (Two
  devices: sharding_test.py's replicated-vs-sharded steps, and train_test.py.)"""
  config = tiny_config(**{"optim.warmup_steps": 0, "optim.lr": 1e-3,
                          "diffusion.parameterization": parameterization,
                          "diffusion.flow_t": flow_t})
  image = next(input_pipeline.create_train_iterator(config))["image"]
  model = factories.create_model(config)
  tables = factories.tables_from_config(config)
  results = {}
  for num_devices in (1, 4):
    mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
    state = train_state_lib.create_train_state(config, model, mesh)
    step = train_step_lib.from_config(config, model,
                                      factories.loss_fn_from_config(config, tables), mesh)
    batch = mesh_lib.global_batch(
        mesh, {"image": image, "preempt": np.zeros(num_devices, np.bool_)})
    state, metrics = step(state, batch)
    results[num_devices] = (float(metrics["grad_norm"]), float(metrics["loss"]),
                            jax.device_get(state.params))
  norm_1, loss_1, params_1 = results[1]
  assert norm_1 > 0
  for num_devices in (4,):
    norm, loss, params = results[num_devices]
    np.testing.assert_allclose(norm, norm_1, rtol=1e-5, err_msg=f"{num_devices} devices")
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p_uncond", [0.0, 0.1, 1.0])
def test_labels_drop_to_the_null_class_at_rate_p_uncond(p_uncond):
  """Classifier-free guidance's label drop (Ho & Salimans 2022): each label becomes the null
  class K with probability p_uncond, the others are kept as they are. A fake model outputs its
  label input beside the image (which carries the true label), so the loss's aux sees both."""
  num_classes, batch = 10, 4096
  mesh = mesh_lib.make_mesh()

  def apply_fn(variables, x, t, y, train, rngs):
    del t, train, rngs
    y = jnp.broadcast_to(y.astype(jnp.float32)[:, None, None, None], x.shape)
    return jnp.concatenate([y + 0.0 * variables["params"]["w"], x], axis=-1)

  def loss_fn(model_fn, x0, t, noise):
    out = model_fn(x0, t)[:, 0, 0]
    given, true = out[:, 0], out[:, 1]
    null = given == num_classes
    aux = {"null": null.astype(jnp.float32),
           "kept_or_null": (null | (given == true)).astype(jnp.float32)}
    return jnp.mean(out ** 2, axis=-1), aux

  step = train_step_lib.make_train_step(
      apply_fn=apply_fn, loss_fn=loss_fn, num_timesteps=10, t_sampling="uniform", ema_decay=0.0,
      learning_rate=optax.constant_schedule(0.0), mesh=mesh, num_classes=num_classes,
      p_uncond=p_uncond)
  tx = optax.sgd(0.0)
  params = {"w": jnp.zeros(())}
  state = train_state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params={"w": jnp.zeros(())},
      opt_state=tx.init(params),
      rng=jax.random.PRNGKey(0), importance=None, tx=tx)
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  labels = np.random.default_rng(0).integers(0, num_classes, batch).astype(np.int32)
  batch_dict = mesh_lib.global_batch(mesh, {
      "image": labels.astype(np.float32).reshape(batch, 1, 1, 1), "label": labels,
      "preempt": np.zeros(jax.device_count(), np.bool_)})
  _, metrics = step(state, batch_dict)
  assert float(metrics["kept_or_null"]) == 1.0
  # Binomial(4096, p) / 4096 is within 5 standard deviations (<= 0.0235 at p = 0.1).
  tolerance = 5 * np.sqrt(p_uncond * (1 - p_uncond) / batch)
  assert abs(float(metrics["null"]) - p_uncond) <= tolerance, float(metrics["null"])
