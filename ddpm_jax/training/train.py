"""The training loop: `train_and_evaluate(config, workdir)`.

Runs on every device of every host, resumes from the newest checkpoint in `workdir/checkpoints`
that restores (moving broken ones aside), saves on SIGTERM, and never saves a non-finite update.
A new run may start from another run's or an imported model's weights (`training.init_from`).
"""

import contextlib
import threading
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections

from configs import base as base_config
from ddpm_jax.config import validation
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import classifier_guidance
from ddpm_jax.evaluation import generation
from ddpm_jax.evaluation import images
from ddpm_jax.evaluation import quality
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import logging_lib
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import sharding
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.training import posthoc_ema_io
from ddpm_jax.training import train_step as train_step_lib


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
  diff = run_config.config_diff(config, base_config.get_config())
  logging.info("Config differs from configs/base.py in %d keys:%s", len(diff),
               "".join(f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()))


def _nonfinite_error(step: int, manager) -> NonFiniteLossError:
  latest = manager.latest_step()
  saved = (f"the newest checkpoint, step {latest} in {manager.directory}, was checked finite "
           "when saved" if latest is not None else
           f"no checkpoint has been saved in {manager.directory}")
  return NonFiniteLossError(
      f"Non-finite loss, gradient norm or updated params/EMA at step {step}; nothing from that "
      f"step on was saved ({saved}). Try a lower --config.optim.lr, gradient clipping, float32 "
      "compute, or --config.training.skip_nonfinite_updates=True.")


def _check_finite(step: int, flags: dict, manager) -> None:
  """`flags` holds the step's device-reduced 'finite' flag, already on the host."""
  if not int(flags["finite"]):
    raise _nonfinite_error(step, manager)


def _fetch(metrics, keys=None) -> dict:
  """Brings (some of) a step's metrics to the host; every host reads the same reduced values."""
  metrics = metrics if keys is None else {k: metrics[k] for k in keys}
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  for parent in (path, *path.parents):
    if parent.exists() and not parent.is_dir():
      raise ValueError(f"--workdir={workdir}: {parent} is a file, not a directory; pass a "
                       "directory (it is created if missing).")
  # Its params-only checkpoint would not restore as a train state and be moved aside as corrupt.
  if (path / checkpointing.IMPORTED_FILE).exists():
    raise ValueError(f"{workdir} holds an imported model; fine-tune it into a new workdir with "
                     f"--config.training.init_from={workdir} --workdir=NEW")


def _start_from(config: ml_collections.ConfigDict, model, mesh, state):
  """`state` (fresh: step 0, zero optimiser moments, this config's rng) with the params of
  `training.init_from` (its EMA params by default) as its params and its EMA.

  Every process restores the same params, replicated on `mesh` (validation checked their shapes).
  """
  tc = config.training
  abstract = train_state_lib.abstract_params(config, model, mesh)
  params, step = checkpointing.restore_params(tc.init_from, abstract, use_ema=tc.init_from_ema)
  logging.info("Starting from the %s params of step %d in %s (training.init_from): step 0, a "
               "fresh optimiser state, EMA = those params.", "EMA" if tc.init_from_ema else "raw",
               step, tc.init_from)
  # Adam's moments are zeros whatever the params, so the fresh state's are kept. The EMAs are
  # copies: the train step donates the state, and one buffer cannot be donated twice.
  phema = None if state.phema is None else train_state_lib.phema_copies(params, len(state.phema))
  new = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params), phema=phema)
  if train_state_lib.shard_state(config):  # the replicated params split as the state's are
    shardings = sharding.named(mesh, train_state_lib.state_specs(config, state, mesh))
    new = sharding.reshard(new, shardings)
  return new


def _restored_is_finite(state) -> None:
  if not bool(jax.device_get(train_step_lib.all_finite(state.params, state.ema_params,
                                                       state.phema))):
    raise FloatingPointError("non-finite params or EMA")


def _recover_snapshots(config, workdir: str, state, step: int,
                       restored_step: int | None) -> None:
  """Puts right what kills left in <workdir>/phema, before the first step (process 0 only).

  Snapshots of steps after the resumed one are set aside (they belong to a trajectory that is
  replayed) under names of this restart's own; temporaries of writes cut short are deleted; and
  the resumed checkpoint's own snapshot, when a kill came between the checkpoint and it, is
  written from the restored state (bitwise what it would have held).
  """
  for path in posthoc_ema_io.set_aside_after(workdir, step):
    logging.warning("A post-hoc EMA snapshot newer than the resumed step %d is set aside as %s.",
                    step, path)
  for path in posthoc_ema_io.remove_temporaries(workdir):
    logging.info("Deleted %s, the temporary file of a snapshot write cut short.", path)
  tc = config.training
  # A checkpoint off the checkpoint_every grid was a final (or preemption) one, with a snapshot.
  due = step % posthoc_ema_io.snapshot_every(config) == 0 or step % tc.checkpoint_every != 0
  if restored_step is not None and due and not posthoc_ema_io.snapshot_path(workdir, step).exists():
    logging.warning("Post-hoc EMA snapshot of step %d is missing (the run stopped between the "
                    "checkpoint and the snapshot): writing it from the checkpoint.", step)
    posthoc_ema_io.write_snapshot(workdir, step, state.phema, tc.phema_sigma_rels,
                                  state.phema_gammas)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       sigterm: threading.Event | None = None) -> dict:
  """Trains to `config.training.num_train_steps`; returns the final metrics (and eval report).

  The report's "preempted" is True when a SIGTERM stopped the run (after saving any new work);
  main.py then exits with `checkpointing.EXIT_PREEMPTED`. A non-finite update raises
  `NonFiniteLossError` without saving it, unless `training.skip_nonfinite_updates` drops it.

  Args:
    config: an experiment config (see configs/base.py).
    workdir: checkpoints, TensorBoard events, metrics/ (one file per run segment) and sample
      grids go here. An existing workdir is resumed from its newest checkpoint that restores
      (see `checkpointing`), after its config is checked against this one (see `run_config`);
      a new one starts from `training.init_from`'s params when that is set.
    sigterm: the flag of a SIGTERM handler installed at start-up (main.py's), so that a SIGTERM
      before the loop counts as a preemption; without it the loop installs its own handler.
  """
  _check_workdir(workdir)
  # Every bad choice fails here, before compile (training.init_from too, unless workdir resumes).
  parts = validation.validate(config, mode="train", workdir=workdir)
  tc = config.training
  manager = checkpointing.create_manager(workdir, keep=tc.keep_checkpoints,
                                         every=tc.checkpoint_every)
  latest = manager.latest_step()
  if latest is not None:
    run_config.check_resume(config, workdir, latest)  # before any compile
    if tc.init_from:
      logging.info("%s has a checkpoint (step %d): resuming it; training.init_from=%s is "
                   "ignored.", workdir, latest, tc.init_from)
    if latest >= tc.num_train_steps:
      logging.warning("The newest checkpoint in %s is step %d, already at or past "
                      "num_train_steps=%d: nothing to train. Raise --config.training."
                      "num_train_steps to continue.", manager.directory, latest,
                      tc.num_train_steps)
      manager.close()
      return {"step": latest, "preempted": False, "already_done": True}
  mesh = mesh_lib.make_mesh()
  model, tables = parts.model, parts.tables
  state = train_state_lib.create_train_state(config, model, mesh)
  _log_startup(config, mesh, state)

  data_iter = input_pipeline.create_train_iterator(config, source=parts.train_source)
  restored, restored_step = checkpointing.restore_newest_good(manager, state, data_iter,
                                                              check=_restored_is_finite)
  if restored is not None:
    logging.info("Resumed from checkpoint step %d in %s.", restored_step, manager.directory)
    state = restored
  elif tc.init_from:
    state = _start_from(config, model, mesh, state)
  if jax.process_index() == 0:
    run_config.record(config, workdir, restored_step)  # only once every check has passed
    input_pipeline.save_class_names(config, workdir, parts.train_source)  # label -> folder name
  step = int(jax.device_get(state.step))
  start_step = step
  # Post-hoc EMA snapshots (<workdir>/phema, see posthoc_ema_io); 0 when off.
  phema_every = posthoc_ema_io.snapshot_every(config) if state.phema is not None else 0
  # What the samplers, the evaluation and the snapshots read: a sharded state's leaves gathered
  # (every process takes part), a replicated state's as they are.
  whole = ((lambda tree: sharding.replicate(tree, mesh)) if train_state_lib.shard_state(config)
           else (lambda tree: tree))
  if phema_every:
    phema = whole(state.phema)
    if jax.process_index() == 0:
      _recover_snapshots(config, workdir, state.replace(phema=phema), step, restored_step)

  train_step = train_step_lib.from_config(config, model, parts.loss_fn, mesh, state)
  # A noise-conditional classifier (training.objective) has no samples to show or score.
  generative = config.training.objective == "diffusion"
  if generative:
    classifier = classifier_guidance.load(parts.classifier, mesh, config.sampling.use_ema)
    bank = generation.low_res_bank(config)  # a super-resolution stage's held-out inputs
    grid_sampler = generation.make_sample_fn(
        config, model, tables, mesh, parts.grid_sample_fn,
        classifier=classifier, sampler_name="ddim", low_res_bank=bank)
  writer = logging_lib.MetricWriter(workdir, first_step=step)
  progress = logging_lib.Progress(step, tc.num_train_steps)
  local_devices = jax.local_device_count()
  conditional = config.model.num_classes > 0  # or the classifier's targets
  metrics, last, preempted = None, {}, False
  t_log = time.perf_counter()
  step_at_log = step

  with checkpointing.PreemptionGuard(sigterm) as guard, _finish_saves(manager):
    # A SIGTERM during start-up (imports, restore, compile) was recorded by the guard; with one
    # process there is nothing to agree on, so stop before the first step. Several processes
    # agree through the first steps' collectives instead.
    preempted = guard.requested and jax.process_count() == 1
    while step < tc.num_train_steps and not preempted:
      batch = next(data_iter)
      batch = {"image": batch["image"], "preempt": guard.local_flags(local_devices),
               **({"label": batch["label"]} if conditional else {})}
      prev_metrics = metrics
      state, metrics = train_step(state, mesh_lib.global_batch(mesh, batch))
      step += 1
      # Only the previous step's two flags are read while this one runs, keeping the device busy;
      # every host reads the same collective-reduced values, so all agree on when to stop.
      if prev_metrics is not None:
        flags = _fetch(prev_metrics, ("finite", "preempt"))
        _check_finite(step - 1, flags, manager)
        preempted = bool(flags["preempt"])
      # JAX's preemption sync point (several processes; every process gets the same answer at
      # the same step) or this process's SIGTERM flag (one process).
      preempted = guard.reached(step) or preempted
      final = step == tc.num_train_steps or preempted
      if step % tc.log_every == 0 or final:
        last = _fetch(metrics)
        _check_finite(step, last, manager)
        now = time.perf_counter()
        imgs_per_s = (step - step_at_log) * tc.batch_size / max(now - t_log, 1e-9)
        t_log, step_at_log = now, step
        scalars = {k: v for k, v in last.items() if k not in ("preempt", "finite")}
        progress.report(step, scalars)
        writer.write_scalars(step, {**scalars, "images_per_sec": imgs_per_s})
      save_now = step % tc.checkpoint_every == 0 or final
      snapshot_now = bool(phema_every) and (step % phema_every == 0 or final)
      if save_now or snapshot_now:  # never save or snapshot a bad update (one host sync)
        _check_finite(step, _fetch(metrics, ("finite",)), manager)
      if save_now:
        checkpointing.save(manager, state, data_iter)
        writer.flush()  # TensorBoard on a bucket: events up to the checkpoint survive a kill
      if snapshot_now:
        phema = whole(state.phema)
        if jax.process_index() == 0:  # copied to the host before the next step donates the state
          posthoc_ema_io.write_snapshot(workdir, step, phema, tc.phema_sigma_rels,
                                        state.phema_gammas)
      if generative and (step % tc.sample_every == 0 or (final and not preempted)):
        _write_grid(config, workdir, writer, grid_sampler, whole(state.ema_params), step)
      if preempted:
        logging.warning("SIGTERM received: saved step %d, exiting with status %d (preempted).",
                        step, checkpointing.EXIT_PREEMPTED)
        break
    if step == start_step and preempted:
      logging.warning("SIGTERM received before the first step: nothing new to save, exiting "
                      "with status %d (preempted).", checkpointing.EXIT_PREEMPTED)

  manager.close()
  report = {"step": step, "preempted": preempted, **last}
  if generative and tc.final_eval_metrics and step == tc.num_train_steps and not preempted:
    report["eval"] = quality.quality_report(
        config, workdir, whole(state.ema_params), mesh, model, tables, step,
        sample_fn=generation.make_sample_fn(config, model, tables, mesh, parts.sample_fn,
                                            classifier=classifier, low_res_bank=bank),
        metrics=tc.final_eval_metrics)
  writer.close()
  return report


@contextlib.contextmanager
def _finish_saves(manager):
  """Commits an in-flight async save even when the loop ends with an error (e.g. a NaN)."""
  try:
    yield
  finally:
    manager.wait_until_finished()


def _write_grid(config, workdir, writer, sampler, ema_params, step) -> None:
  n = config.training.num_grid_samples
  samples, _ = sampler(ema_params, jax.random.PRNGKey(config.sampling.seed), n)
  grid = images.make_grid(images.to_uint8(samples))
  if jax.process_index() == 0:
    scale = max(1, 128 // config.data.image_size)
    images.save_png(epath.Path(workdir) / "samples" / f"grid_{step:08d}.png", grid, scale=scale)
    writer.write_image(step, "samples_ema", grid)
