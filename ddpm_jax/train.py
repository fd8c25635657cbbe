"""The training loop: `train_and_evaluate(config, workdir)`.

Runs on every device of every host, resumes from the newest complete checkpoint in
`workdir/checkpoints`, saves on SIGTERM, and refuses to save (or continue) after a non-finite loss.
"""

import contextlib
import time

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from configs import base as base_config
from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import evaluate
from ddpm_jax import fid_eval
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import logging_lib
from ddpm_jax import models
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import train_step as train_step_lib


class NonFiniteLossError(FloatingPointError):
  pass


def _log_startup(config, mesh, state) -> None:
  n_dev, n_proc = jax.device_count(), jax.process_count()
  batch = config.training.batch_size
  logging.info("JAX %s on %s: %d devices over %d process(es); this is process %d with %d local "
               "devices.", jax.__version__, jax.devices()[0].platform, n_dev, n_proc,
               jax.process_index(), jax.local_device_count())
  logging.info("Global batch %d = %d per process = %d per device; mesh %s.", batch,
               batch // n_proc, batch // n_dev, dict(mesh.shape))
  logging.info("Model: %s parameters.",
               f"{train_state_lib.param_count(state.params):,}")
  diff = config_lib.config_diff(config, base_config.get_config())
  logging.info("Config differs from configs/base.py in %d keys:%s", len(diff),
               "".join(f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()))


def _fetch_checked(step: int, metrics, manager) -> dict:
  """Brings a step's metrics to the host; a non-finite loss ends the run, naming the step.

  The gradient norm is checked too: the loss is computed before the update, so a finite loss
  with non-finite gradients would otherwise let NaN params through to the next checkpoint.
  """
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = {k: metrics[k] for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])}
  if bad:
    raise NonFiniteLossError(
        f"Non-finite {bad} at step {step}. Nothing was saved after it: the "
        f"newest good checkpoint is step {manager.latest_step()} in {manager.directory}. Try a "
        "lower --config.optim.lr, gradient clipping, or float32 compute.")
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to `config.training.num_train_steps`; returns the final metrics (and eval report).

  Args:
    config: an experiment config (see configs/base.py).
    workdir: checkpoints, TensorBoard events, metrics.jsonl and sample grids go here. An existing
      workdir is resumed from its newest complete checkpoint.
  """
  config_lib.validate_config(config)  # every bad choice fails here, before any compile
  if "fid" in config.training.final_eval_metrics:
    fid_eval.check_inception_weights(config)  # now, not after hours of training
  tc = config.training
  mesh = train_step_lib.make_mesh()
  model = models.create_model(config)
  tables = config_lib.tables_from_config(config)
  state = train_state_lib.create_train_state(config, model, mesh)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(config_lib.config_to_json(config))
  _log_startup(config, mesh, state)

  data_iter = input_pipeline.create_train_iterator(config)
  manager = checkpointing.create_manager(workdir, max_to_keep=tc.keep_checkpoints)
  if manager.latest_step() is not None:
    logging.info("Resuming from checkpoint step %d in %s.", manager.latest_step(),
                 manager.directory)
    state = checkpointing.restore(manager, state, data_iter)
  step = int(jax.device_get(state.step))

  train_step = config_lib.train_step_from_config(config, model, tables, mesh)
  grid_sampler = evaluate.make_sample_fn(
      config, model, tables, mesh, sampler="ddim",
      num_steps=min(tc.grid_sampler_steps, config.diffusion.num_timesteps))
  writer = logging_lib.MetricWriter(workdir)
  progress = logging_lib.Progress(step, tc.num_train_steps)
  local_devices = jax.local_device_count()
  metrics, last, preempted = None, {}, False
  t_log = time.perf_counter()
  step_at_log = step

  with checkpointing.PreemptionGuard() as guard, _finish_saves(manager):
    while step < tc.num_train_steps:
      batch = next(data_iter)
      batch = {"image": batch["image"], "preempt": guard.local_flags(local_devices)}
      prev_metrics = metrics
      state, metrics = train_step(state, train_step_lib.global_batch(mesh, batch))
      step += 1
      # The previous step's metrics are read while this one runs, keeping the device busy.
      # Every host reads the same collective-reduced values, so all agree on when to stop.
      if prev_metrics is not None:
        last = _fetch_checked(step - 1, prev_metrics, manager)
      preempted = bool(last.get("preempt", 0))
      final = step == tc.num_train_steps or preempted
      if step % tc.log_every == 0 or final:
        last = _fetch_checked(step, metrics, manager)
        now = time.perf_counter()
        imgs_per_s = (step - step_at_log) * tc.batch_size / max(now - t_log, 1e-9)
        t_log, step_at_log = now, step
        scalars = {k: v for k, v in last.items() if k != "preempt"}
        progress.report(step, scalars)
        writer.write_scalars(step, {**scalars, "images_per_sec": imgs_per_s})
      if step % tc.checkpoint_every == 0 or final:
        _fetch_checked(step, metrics, manager)  # never save params that produced a NaN
        checkpointing.save(manager, state, data_iter)
      if step % tc.sample_every == 0 or (final and not preempted):
        _write_grid(config, workdir, writer, grid_sampler, state, step)
      if preempted:
        logging.warning("SIGTERM received: saved step %d, exiting cleanly.", step)
        break

  manager.close()
  report = {"step": step, "preempted": preempted, **last}
  if tc.final_eval_metrics and step == tc.num_train_steps:
    report["eval"] = evaluate.quality_report(config, workdir, state.ema_params, mesh, model,
                                             tables, step, metrics=tc.final_eval_metrics)
  writer.close()
  return report


@contextlib.contextmanager
def _finish_saves(manager):
  """Commits an in-flight async save even when the loop ends with an error (e.g. a NaN)."""
  try:
    yield
  finally:
    manager.wait_until_finished()


def _write_grid(config, workdir, writer, sampler, state, step) -> None:
  n = config.training.num_grid_samples
  samples, _ = sampler(state.ema_params, jax.random.PRNGKey(config.sampling.seed), n)
  grid = images.make_grid(images.to_uint8(samples))
  if jax.process_index() == 0:
    scale = max(1, 128 // config.data.image_size)
    images.save_png(epath.Path(workdir) / "samples" / f"grid_{step:08d}.png", grid, scale=scale)
    writer.write_image(step, "samples_ema", grid)
