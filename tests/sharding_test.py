"""The sharded train state (FSDP / ZeRO-3, `training.shard_state`) on 1, 2 and 4 simulated devices:
the same step as the replicated state, 1/N of the bytes per device, and checkpoints that resume
on another device count."""

import functools

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ddpm_jax.config import factories
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import sharding
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import train_step as train_step_lib

from helpers import tiny_config

EPS32 = float(np.finfo(np.float32).eps)
LR = 1e-3
# Adam with eps = 1: its update lr g / (sqrt(v) + 1) is Lipschitz in the gradient (constant
# about lr), so a rounding-level difference of two gradients stays a rounding-level difference
# of the params. With eps = 1e-8 the first update is about lr sign(g), which turns the rounding
# noise of a gradient entry near 0 into a step of up to lr (the fragility of issue 32), and would
# test Adam's amplification instead of the sharding.
BASE = {"optim.warmup_steps": 0, "optim.lr": LR, "optim.eps": 1.0}
DIT = {"model.name": "dit", "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2}


def _config(name: str, shard: bool, clip: float):
  return tiny_config(**{**BASE, **(DIT if name == "dit" else {}),
                        "training.shard_state": shard, "optim.grad_clip": clip})


# The global-norm clip, small enough to act on every step here (the gradient norm is > 0.1), so
# that the sharded norm, its psum over the shards and the clip factor are all exercised.
CLIP = 1e-3


@functools.cache
def _setup(name: str, num_devices: int, shard: bool, clip: float = CLIP):
  """(config, mesh, model, jitted step) for a model on the first `num_devices` devices."""
  config = _config(name, shard, clip)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  model = factories.create_model(config)
  loss_fn = factories.loss_fn_from_config(config, factories.tables_from_config(config))
  state = jax.eval_shape(lambda: train_state_lib.create_train_state(config, model, mesh))
  return config, mesh, model, train_step_lib.from_config(config, model, loss_fn, mesh, state)


def _batch(mesh, batch: dict) -> dict:
  return mesh_lib.global_batch(mesh, {"image": batch["image"],
                                      "preempt": np.zeros(mesh.size, np.bool_)})


@functools.cache
def _one_step(name: str, num_devices: int, shard: bool, clip: float = CLIP):
  """One step from the initial state: (metrics, params, EMA) on the host."""
  config, mesh, model, step = _setup(name, num_devices, shard, clip)
  state = train_state_lib.create_train_state(config, model, mesh)
  image = next(input_pipeline.create_train_iterator(config))
  state, metrics = step(state, _batch(mesh, image))
  return jax.device_get(metrics), jax.device_get(state.params), jax.device_get(state.ema_params)


def test_leaf_spec_splits_the_largest_divisible_dimension_of_large_leaves():
  assert sharding.leaf_spec((3, 3, 64, 128), 4) == P(None, None, None, "data")
  assert sharding.leaf_spec((3, 3, 128, 64), 4) == P(None, None, "data")
  assert sharding.leaf_spec((1001, 256), 4) == P(None, "data")  # 1001 is not divisible
  assert sharding.leaf_spec((1001, 255), 4) == P()  # nothing divides: replicated
  assert sharding.leaf_spec((512,), 4) == P()  # small: replicated
  assert sharding.leaf_spec((4096,), 1) == P()


@pytest.mark.parametrize("name,num_devices", [("dit", 1), ("dit", 2), ("dit", 4), ("unet", 4)])
def test_the_sharded_step_equals_the_replicated_step(name, num_devices):
  """One step of a sharded state on N devices against the replicated state on one device, from
  the same initial params and batch, with the global-norm clip acting. The forward pass sees the
  same params (gathered bitwise); the gradient is the same sum
  of per-device terms in another order: each entry, a sum over the batch's 8 x 64 pixels and
  examples, moves by at most about n = 512 eps32 of the largest gradient entry, itself at most
  the gradient norm G. Clipping scales the gradient by c / G when G > c, and G's own rounding
  (n eps32 relative) adds as much again: the clipped gradient moves by at most 2 n eps32
  min(G, c). An update of Lipschitz constant lr (Adam with eps = 1) moves the params by at most
  lr times that, and the EMA by (1 - decay) of it. The loss and the norm are sums of the same
  terms in another order: n eps32 relative."""
  clip = CLIP
  metrics_1, params_1, ema_1 = _one_step(name, 1, False)
  metrics, params, ema = _one_step(name, num_devices, True)
  grad_norm = float(metrics_1["grad_norm"])
  assert grad_norm > 100 * clip  # the clip acts
  n = 512
  np.testing.assert_allclose(metrics["loss"], metrics_1["loss"], rtol=n * EPS32)
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=n * EPS32)
  bound = LR * 2 * n * EPS32 * min(grad_norm, clip)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)
  for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(ema_1)):
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)
  # The step moved the params by far more than the bound: the comparison can fail.
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(params_1), jax.tree.leaves(_initial_params(name))))
  assert moved > 1000 * bound


@functools.cache
def _initial_params(name: str):
  config, mesh, model, _ = _setup(name, 1, False)
  return jax.device_get(train_state_lib.create_train_state(config, model, mesh).params)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_state_bytes_per_device_fall_to_one_nth(name):
  """Read from the arrays' addressable shards, and from the compiled step's memory analysis
  (its arguments are the state and the device's slice of the batch): each device holds 1/4 of
  every sharded leaf and all of each replicated (small) one."""
  config, mesh, model, step = _setup(name, 4, True)
  state = train_state_lib.create_train_state(config, model, mesh)
  specs = train_state_lib.state_specs(config, state, mesh)
  per_device = sharding.bytes_per_device(state)
  assert len(per_device) == 4 and len(set(per_device.values())) == 1
  held = next(iter(per_device.values()))
  assert held == sharding.expected_bytes(state, specs, 4)
  batch = _batch(mesh, next(input_pipeline.create_train_iterator(config)))
  batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(batch))
  analysis = step.lower(state, batch).compile().memory_analysis()
  assert analysis.argument_size_in_bytes == held + batch_bytes
  whole = sum(x.nbytes for x in jax.tree.leaves(state))  # what a replicated state holds
  leaves = jax.tree.leaves(state)
  specs = jax.tree.leaves(sharding.state_specs(state, 4, True), is_leaf=lambda x: isinstance(x, P))
  small = sum(x.nbytes for x, s in zip(leaves, specs) if sharding.sharded_dim(s) is None)
  assert held <= whole / 4 + small
  assert small < 0.1 * whole  # the replicated leaves are a small part of the state


def test_a_sharded_checkpoint_at_4_devices_resumes_at_2_and_1(tmp_path):
  """Two steps on 4 devices, a checkpoint, two more: the checkpoint restores at 2 and at 1
  device bitwise, laid out 1/N per device, and the two steps after it draw the same batches and
  reach the 4-device run's params within two steps' rounding (the bound of the test above,
  twice)."""
  config, mesh, model, step = _setup("unet", 4, True)
  data = input_pipeline.create_train_iterator(config)
  state = train_state_lib.create_train_state(config, model, mesh)
  for _ in range(2):
    state, _ = step(state, _batch(mesh, next(data)))
  manager = checkpointing.create_manager(str(tmp_path), keep=None)
  checkpointing.save(manager, state, data)
  manager.wait_until_finished()
  saved = jax.device_get(state.params)
  after, grad_norms = [], []
  for _ in range(2):
    batch = next(data)
    after.append(batch["image"])
    state, metrics = step(state, _batch(mesh, batch))
    grad_norms.append(float(metrics["grad_norm"]))
  final = jax.device_get(state.params)
  bound = 2 * LR * 2 * 512 * EPS32 * min(max(grad_norms), CLIP)
  for num_devices in (2, 1):
    config_n, mesh_n, model_n, step_n = _setup("unet", num_devices, True)
    target = train_state_lib.create_train_state(config_n, model_n, mesh_n)
    data_n = input_pipeline.create_train_iterator(config_n)
    restored = checkpointing.restore(manager, target, data_n)
    assert int(restored.step) == 2
    for got, want in zip(jax.tree.leaves(jax.device_get(restored.params)),
                         jax.tree.leaves(saved)):
      np.testing.assert_array_equal(got, want)
    specs = train_state_lib.state_specs(config_n, restored, mesh_n)
    assert set(sharding.bytes_per_device(restored).values()) == {
        sharding.expected_bytes(restored, specs, num_devices)}
    for image in after:
      batch = next(data_n)
      np.testing.assert_array_equal(batch["image"], image)
      restored, _ = step_n(restored, _batch(mesh_n, batch))
    for got, want in zip(jax.tree.leaves(jax.device_get(restored.params)),
                         jax.tree.leaves(final)):
      np.testing.assert_allclose(got, want, rtol=0, atol=bound)
  manager.close()

