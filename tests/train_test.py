"""Tests for ddpm_jax.train and ddpm_jax.train_step on a tiny U-Net and 4 simulated CPU devices.

Each `train_and_evaluate` call compiles the same few programs again (its step is a new closure),
so they load from the session's persistent compilation cache (conftest.py), and one 20-step run
(the `reference_run` fixture) serves both the resume test and the logging test.
"""

import collections
import json
import os
import re
import struct

import jax
import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2
import tensorflow_datasets as tfds

from ddpm_jax import models
from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import schedules
from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import train
from ddpm_jax.training import train_step as train_step_lib

from helpers import checkpoint_entries
from helpers import read_metrics
from helpers import restore_state
from helpers import tiny_config

NUM_DEVICES = 4  # set by conftest.py
def _make_state_and_step(config, mesh):
  """The train state and step exactly as train_and_evaluate builds them, on `mesh`."""
  model = factories.create_model(config)
  tables = factories.tables_from_config(config)
  state = train_state_lib.create_train_state(config, model, mesh)
  return state, train_step_lib.from_config(config, model,
                                           factories.loss_fn_from_config(config, tables), mesh)


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("t_sampling", ["uniform", "importance"])
def test_one_and_four_devices_train_the_same_model(t_sampling):
  config = tiny_config(**{"diffusion.t_sampling": t_sampling})
  m = config.model
  # The params' bound below needs several channels in every GroupNorm group.
  assert min(models.group_norm_channels(m.ch, tuple(m.ch_mult), m.num_res_blocks)) > m.num_groups
  data = input_pipeline.create_train_iterator(config)
  images = [next(data)["image"] for _ in range(3)]
  runs = {}
  for num_devices in (1, NUM_DEVICES):
    mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
    state, step = _make_state_and_step(config, mesh)
    initial = jax.device_get(state.params)  # copied out before the step donates the state
    history = []
    for image in images:
      batch = {"image": image, "preempt": np.zeros(num_devices, np.bool_)}
      state, metrics = step(state, mesh_lib.global_batch(mesh, batch))
      history.append(jax.device_get(metrics))
    runs[num_devices] = initial, jax.device_get(state), history

  (init_1, state_1, history_1), (init_n, state_n, history_n) = runs[1], runs[NUM_DEVICES]
  for key, value in _leaves(init_1).items():
    np.testing.assert_array_equal(_leaves(init_n)[key], value, err_msg=key)
  # The run has to move the params, or agreement would prove nothing (step 1 has lr 0).
  moved = max(np.max(np.abs(after - before)) for after, before in
              zip(jax.tree.leaves(state_n.params), jax.tree.leaves(init_n)))
  assert moved > 1e-4
  assert int(state_1.step) == int(state_n.step) == 3
  np.testing.assert_array_equal(state_n.rng, state_1.rng)
  # Only the summation order differs (per-device partial sums, then a pmean), so everything
  # agrees to float32 rounding (rtol 1e-5, atol 1e-6). A param's gradient is a sum over examples
  # and pixels whose rounding differs by a relative delta ~ 1e-6, more where its terms cancel
  # (delta ~ 1e-6 sum |terms| / |sum|). Adam's step lr m_hat / sqrt(v_hat) is scale-invariant and
  # changes by at most about lr delta when a gradient changes by delta, so the params differ by
  # about sum_t lr_t delta, plus an ulp of the param (within rtol). The tiny model's GroupNorms
  # have several channels per group (helpers.TINY), so no gradient is zero by construction: an
  # absolute tolerance of 1e-3 of the summed learning rates (6e-7) allows cancellation by a few
  # hundred, and the worst entry here differs by 7e-8. (With one channel per group the bias of
  # the conv before a GroupNorm has a zero gradient, which Adam turns into steps of about lr in
  # the rounding noise's direction: 1e-6 here, over this bound.)
  schedule = train_state_lib.learning_rate_schedule(config.optim)
  params_atol = 1e-3 * sum(float(schedule(i)) for i in range(len(images)))
  if t_sampling == "importance":
    # Every device holds the same all-gathered history, in the order of the global batch.
    np.testing.assert_array_equal(state_n.importance.counts, state_1.importance.counts)
    assert int(state_n.importance.counts.sum()) == len(images) * config.training.batch_size
  for name, atol in (("params", params_atol), ("ema_params", 1e-6), ("opt_state", 1e-6),
                     ("importance", 1e-6)):
    expected = _leaves(getattr(state_1, name))
    for key, value in _leaves(getattr(state_n, name)).items():
      np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=atol,
                                 err_msg=f"{name}{key}")
  for metrics_1, metrics_n in zip(history_1, history_n):
    assert metrics_1.keys() == metrics_n.keys()
    for key in metrics_1:
      np.testing.assert_allclose(metrics_n[key], metrics_1[key], rtol=1e-5, atol=1e-6,
                                 err_msg=key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 20-step run, checkpointed at 10 and 20 and logged every 5 steps."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(**{"training.num_train_steps": 20})
  report = train.train_and_evaluate(config, workdir)
  return config, workdir, report


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(reference_run, tmp_path):
  config, reference_dir, reference_report = reference_run
  workdir = str(tmp_path)
  first = train.train_and_evaluate(tiny_config(**{"training.num_train_steps": 10}), workdir)
  assert first["step"] == 10 and checkpoint_entries(workdir) == ["10"]
  second = train.train_and_evaluate(config, workdir)

  assert second["step"] == 20 and not second["preempted"]
  # It resumed at 10 rather than starting over: each logged step appears once.
  assert [m["step"] for m in read_metrics(workdir)] == [5, 10, 15, 20]
  assert checkpoint_entries(workdir) == checkpoint_entries(reference_dir) == ["10", "20"]
  expected = _leaves(restore_state(config, reference_dir))
  resumed = _leaves(restore_state(config, workdir))
  assert resumed.keys() == expected.keys()
  assert any(".ema_params" in key for key in resumed)
  for key, value in resumed.items():
    assert np.array_equal(value, expected[key]), f"{key} differs after resuming"
  assert second["loss"] == reference_report["loss"]
  # The data iterator resumed too: both runs stopped at the same record.
  positions = []
  for run_dir in (reference_dir, workdir):
    with open(os.path.join(run_dir, "checkpoints", "20", "data", checkpointing.DATA_FILE),
              encoding="utf-8") as f:
      positions.append(json.load(f)["position"])
  assert positions[0] == positions[1] == 20


def _tensorboard_events(workdir) -> list:
  """Every Event in workdir/tb, read from the TFRecord framing (length, crc, data, crc)."""
  tb_dir = os.path.join(workdir, "tb")
  events = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def _check_grid(path, image_size: int, channels: int) -> None:
  """The PNG is a 2x2 grid of 4 samples with white 1-pixel borders, upscaled by an integer."""
  side = 2 * (image_size + 1) + 1
  with Image.open(path) as png:
    assert png.mode == ("L" if channels == 1 else "RGB")
    pixels = np.asarray(png)
  assert pixels.shape[0] == pixels.shape[1] and pixels.shape[0] % side == 0, pixels.shape
  grid = pixels[::pixels.shape[0] // side, ::pixels.shape[0] // side]  # undo the upscaling
  for border in (0, image_size + 1, side - 1):
    assert np.all(grid[border] == 255) and np.all(grid[:, border] == 255)


def test_run_writes_metrics_tensorboard_and_sample_grid(reference_run):
  config, workdir, report = reference_run
  lines = read_metrics(workdir)
  assert [line["step"] for line in lines] == [5, 10, 15, 20]
  schedule = train_state_lib.learning_rate_schedule(config.optim)
  for line in lines:
    for key in ("loss", "grad_norm", "lr", "images_per_sec"):
      assert np.isfinite(line[key]), (key, line)
    assert line["images_per_sec"] > 0
    # The logged rate is the one the step used, i.e. at the state's step before the update.
    np.testing.assert_allclose(line["lr"], schedule(line["step"] - 1), rtol=1e-6)
  assert lines[-1]["loss"] == pytest.approx(report["loss"])

  events = _tensorboard_events(workdir)
  scalars = {(value.tag, event.step): value.simple_value
             for event in events for value in event.summary.value
             if value.HasField("simple_value")}
  images = {(value.tag, event.step) for event in events for value in event.summary.value
            if value.HasField("image")}
  for line in lines:
    for key in ("loss", "grad_norm", "lr", "images_per_sec"):
      assert scalars[(key, line["step"])] == pytest.approx(line[key], rel=1e-6)
  assert ("samples_ema", 20) in images

  # 4 samples of 8x8 in a 2x2 grid with 1-pixel borders: 19 px, scaled up for viewing.
  _check_grid(os.path.join(workdir, "samples", "grid_00000020.png"), image_size=8, channels=1)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["training"]["num_train_steps"] == 20


class _PoisonedIterator:
  """The real (checkpointable) iterator, with NaN images from batch `first_bad` on."""

  def __init__(self, iterator, first_bad: int):
    self._iterator, self._first_bad, self._count = iterator, first_bad, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self._count += 1
    if self._count >= self._first_bad:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  # What grain.checkpoint.CheckpointHandler calls.
  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)

  def start_prefetch(self):
    self._iterator.start_prefetch()


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
  real = input_pipeline.create_train_iterator
  monkeypatch.setattr(input_pipeline, "create_train_iterator",
                      lambda config, **kwargs: _PoisonedIterator(real(config, **kwargs),
                                                                 first_bad=3))
  config = tiny_config(**{"training.num_train_steps": 8, "training.checkpoint_every": 2})
  workdir = str(tmp_path)

  with pytest.raises(train.NonFiniteLossError, match=r"at step 3\b") as error:
    train.train_and_evaluate(config, workdir)

  assert re.search(r"\bstep 2\b", str(error.value))  # the newest good checkpoint
  # Right after the error, as a process exiting on it would leave it: step 2 is committed
  # (no temporary directory), and nothing from step 3 on was saved.
  assert checkpoint_entries(workdir) == ["2"]
  state = restore_state(config, workdir)
  assert int(state.step) == 2
  for key, value in {**_leaves(state.params), **_leaves(state.ema_params)}.items():
    assert np.all(np.isfinite(value)), key


def _no_compiling(*args, **kwargs):
  raise AssertionError("jax.jit was called before the config was rejected")


def test_batch_that_does_not_divide_over_devices_fails_before_compiling(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "jit", _no_compiling)
  config = tiny_config(**{"training.batch_size": 6})
  with pytest.raises(ValueError, match=r"batch_size=6.*divi") as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  suggested = re.search(r"--config\.training\.batch_size=(\d+)", str(error.value))
  assert suggested, error.value
  assert int(suggested.group(1)) > 0 and int(suggested.group(1)) % NUM_DEVICES == 0
  assert not os.path.exists(tmp_path / "run")


def test_unknown_schedule_lists_the_valid_ones_before_compiling(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "jit", _no_compiling)
  config = tiny_config(**{"diffusion.schedule": "nope"})
  with pytest.raises(ValueError, match=r"diffusion\.schedule 'nope'") as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  for name in schedules.SCHEDULES:
    assert repr(name) in str(error.value)
  assert not os.path.exists(tmp_path / "run")


def _count_calls(monkeypatch, calls, module, name, key=None):
  fn = getattr(module, name)

  def counted(*args, **kwargs):
    calls[name if key is None else key(*args, **kwargs)] += 1
    return fn(*args, **kwargs)
  monkeypatch.setattr(module, name, counted)


def test_one_step_end_to_end_on_mock_cifar10(tmp_path, monkeypatch):
  config = tiny_config("cifar10", **{"training.num_train_steps": 1})
  workdir = str(tmp_path)
  calls = collections.Counter()
  _count_calls(monkeypatch, calls, validation, "validate")
  for name in ("tables_from_config", "create_model", "loss_fn_from_config",
               "sampler_from_config"):
    _count_calls(monkeypatch, calls, factories, name)
  _count_calls(monkeypatch, calls, input_pipeline, "open_source",
               key=lambda data, split: f"open {split}")
  with tfds.testing.mock_data(num_examples=16):
    report = train.train_and_evaluate(config, workdir)
  # Following the config from the entry point: one validation, each factory once (the sampler
  # factory builds two samplers: the configured one and the training grids' DDIM), each split
  # opened once.
  assert calls == {"validate": 1, "tables_from_config": 1, "create_model": 1,
                   "loss_fn_from_config": 1, "sampler_from_config": 2,
                   f"open {config.data.train_split}": 1, f"open {config.data.eval_split}": 1}

  assert report["step"] == 1 and np.isfinite(report["loss"])
  assert checkpoint_entries(workdir) == ["1"]
  (line,) = read_metrics(workdir)
  assert line["step"] == 1 and np.isfinite(line["loss"])
  _check_grid(os.path.join(workdir, "samples", "grid_00000001.png"), image_size=32, channels=3)


def test_workdir_that_is_a_file_fails_before_compiling(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "jit", _no_compiling)
  path = tmp_path / "run"
  path.write_text("not a directory")
  with pytest.raises(ValueError, match=r"is a file, not a directory"):
    train.train_and_evaluate(tiny_config(), str(path))


def test_unknown_dataset_is_named_before_any_metric_check(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "jit", _no_compiling)
  config = tiny_config(**{"data.dataset": "digitz", "eval.metrics": ("digits_score",)})
  with pytest.raises(ValueError, match=r"data\.dataset 'digitz'.*'digits'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.usefixtures("optimized_xla")  # 2 x 360 examples x T = 20 U-Net calls: run-bound
def test_bits_per_dim_over_an_uneven_last_batch_is_the_mean_over_real_examples():
  from ddpm_jax.core import losses  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import quality  # pylint: disable=g-import-not-at-top
  # 360 held-out digits in batches of 16: the last batch holds 8 real and 8 padded examples.
  config = tiny_config(**{"eval.batch_size": 16, "eval.bpd_num_examples": 0})
  mesh = mesh_lib.make_mesh()
  model = factories.create_model(config)
  tables = factories.tables_from_config(config)
  params = train_state_lib.create_train_state(config, model, mesh).params
  report = quality.bits_per_dim(config, model, tables, mesh, params)
  assert report["bpd_num_examples"] == 360

  d = config.diffusion
  model_fn = lambda p: lambda x, t: model.apply({"params": p}, x, t, train=False)
  vlb = jax.jit(lambda p, x, r: losses.vlb_bpd(model_fn(p), tables, x, r,
                                              model_output=d.model_output,
                                              model_var=d.model_var, clip_x0=d.clip_x0))
  rng = jax.random.PRNGKey(config.training.seed + 1)
  real = []
  for i, batch in enumerate(input_pipeline.create_eval_iterator(config)):
    total = np.asarray(vlb(params, batch["image"], jax.random.fold_in(rng, i))["total"])
    real.append(total[np.asarray(batch["mask"])])
  real = np.concatenate(real)
  assert real.size == 360
  np.testing.assert_allclose(report["bpd_total"], real.mean(), rtol=1e-5)
