"""`--mode=sample` and `--mode=eval`: samples, bits/dim, FID/IS and the offline digits score.

Samplers run under `jax.jit` with the batch sharded over every device (the model input is
constrained to the mesh's `data` axis, and XLA partitions the whole loop); the noise is drawn at
the global shape, so a seed gives the same samples on 1 or N devices.
"""

import json
import os
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import losses
from ddpm_jax import models
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import train_step as train_step_lib


def _to_host(x) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_sample_fn(config, model, tables, mesh, *, sampler=None, num_steps=None,
                   trajectory_every=0):
  """Returns `fn(params, rng, n) -> (uint8-ready float samples [n, H, W, C], trajectory)` on host."""
  sample = config_lib.sampler_from_config(config, tables, sampler=sampler, num_steps=num_steps,
                                          trajectory_every=trajectory_every)
  sharding = train_step_lib.batch_sharding(mesh)
  d = config.data
  compiled = {}

  def run(params, rng, shape):
    def model_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, sharding)
      return model.apply({"params": params}, x, t, train=False)
    return sample(model_fn, rng, shape)

  def executable(params, rng, n):
    """The compiled sampler for `n` samples (padded to a multiple of the device count)."""
    padded = -(-n // jax.device_count()) * jax.device_count()
    shape = (padded, d.image_size, d.image_size, d.num_channels)
    if shape not in compiled:
      compiled[shape] = jax.jit(lambda p, r: run(p, r, shape)).lower(params, rng).compile()
    return compiled[shape]

  def fn(params, rng, n):
    x0, traj = executable(params, rng, n)(params, rng)
    traj = None if traj is None else {k: _to_host(v) for k, v in traj.items()}
    return _to_host(x0)[:n], traj

  fn.compile = executable  # compiles without sampling, e.g. to time sampling alone
  return fn


def _setup(config):
  config_lib.validate_config(config, check_data=False)
  mesh = train_step_lib.make_mesh()
  model = models.create_model(config)
  tables = config_lib.tables_from_config(config)
  return mesh, model, tables


def _load_params(config, workdir, mesh, model):
  target = train_state_lib.create_train_state(config, model, mesh)
  params, step = checkpointing.restore_params(workdir, target, use_ema=config.sampling.use_ema)
  logging.info("Loaded %s params of step %d from %s.", "EMA" if config.sampling.use_ema else "raw",
               step, workdir)
  return params, step


def draw_samples(config, sample_fn, params, num_samples: int, first_batch_fn=None):
  """`num_samples` samples in global batches of `sampling.batch_size`, one rng per batch.

  `first_batch_fn` (a sampler that records its trajectory) draws the first batch, if given;
  its trajectory is returned, so only one batch pays for recording and gathering it.
  """
  rng = jax.random.PRNGKey(config.sampling.seed)
  out, traj = [], None
  for i in range(-(-num_samples // config.sampling.batch_size)):
    n = min(config.sampling.batch_size, num_samples - i * config.sampling.batch_size)
    fn = first_batch_fn if (i == 0 and first_batch_fn is not None) else sample_fn
    x0, t = fn(params, jax.random.fold_in(rng, i), n)
    out.append(images.to_uint8(x0))
    traj = t if i == 0 else traj
  return np.concatenate(out), traj


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `samples/<sampler>_<steps>.npz` (uint8), a PNG grid and a trajectory figure."""
  mesh, model, tables = _setup(config)
  params, step = _load_params(config, workdir, mesh, model)
  s = config.sampling
  sample_fn = make_sample_fn(config, model, tables, mesh)
  traj_fn = make_sample_fn(config, model, tables, mesh, trajectory_every=s.trajectory_every)
  samples, traj = draw_samples(config, sample_fn, params, s.num_samples, first_batch_fn=traj_fn)
  stem = epath.Path(workdir) / "samples" / f"{sampler_label(config)}_step{step}"
  path = stem.with_suffix(".npz")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      np.savez_compressed(f, samples=samples)
    scale = max(1, 128 // config.data.image_size)
    images.save_png(stem.with_suffix(".png"), images.make_grid(samples[:100]), scale=scale)
    if traj is not None:
      images.save_trajectory_figure(stem.parent / f"{stem.name}_trajectory.png", traj)
  logging.info("Wrote %d samples to %s.", len(samples), path)
  return str(path)


def sampler_label(config) -> str:
  """e.g. 'ddim_50', or 'ancestral_1000' (ancestral sampling always takes all T steps)."""
  s = config.sampling
  steps = config.diffusion.num_timesteps if s.sampler == "ancestral" else s.num_steps
  return f"{s.sampler}_{steps}"


def bits_per_dim(config, model, tables, mesh, params) -> dict:
  """The full VLB (all T terms) on the eval split, with its components, in bits/dim."""
  d = config.diffusion
  sharding = train_step_lib.batch_sharding(mesh)

  @jax.jit
  def batch_vlb(params, x0, rng):
    def model_fn(x, t):
      return model.apply({"params": params}, x, t, train=False)
    return losses.vlb_bpd(model_fn, tables, x0, rng, model_output=d.model_output,
                          model_var=d.model_var, clip_x0=d.clip_x0)

  totals, count = {}, 0
  limit = config.eval.bpd_num_examples or float("inf")
  rng = jax.random.PRNGKey(config.training.seed + 1)
  for i, batch in enumerate(input_pipeline.create_eval_iterator(config)):
    x0 = jax.make_array_from_process_local_data(sharding, batch["image"])
    mask = _to_host(jax.make_array_from_process_local_data(sharding, batch["mask"]))
    mask = mask & (np.cumsum(mask) <= limit - count)  # score exactly `bpd_num_examples` examples
    terms = {k: _to_host(v) for k, v in batch_vlb(params, x0, jax.random.fold_in(rng, i)).items()}
    for k, v in terms.items():
      totals[k] = totals.get(k, 0.0) + float(np.sum(v[mask]))
    count += int(mask.sum())
    if count >= limit:
      break
  return {f"bpd_{k}": v / count for k, v in totals.items()} | {"bpd_num_examples": count}


def quality_report(config, workdir, params, mesh, model, tables, step, metrics=None) -> dict:
  """Each of `metrics` (default `config.eval.metrics`); logged and written to eval/step_<N>.json."""
  metrics = tuple(config.eval.metrics if metrics is None else metrics)
  report = {"step": step}
  needs_samples = {"fid", "digits_score"} & set(metrics)
  if needs_samples:
    sample_fn = make_sample_fn(config, model, tables, mesh)
    s = config.sampling
    for n in {min(s.batch_size, s.num_samples), s.num_samples % s.batch_size or s.batch_size}:
      sample_fn.compile(params, jax.random.PRNGKey(0), n)  # every batch shape, outside the timing
    start = time.perf_counter()
    samples, _ = draw_samples(config, sample_fn, params, config.sampling.num_samples)
    report["samples_per_sec"] = len(samples) / (time.perf_counter() - start)
    report["num_samples"] = len(samples)
    report["sampler"] = sampler_label(config)
  if "digits_score" in metrics:
    from ddpm_jax.metrics import digits_classifier  # pylint: disable=g-import-not-at-top
    score = digits_classifier.digits_score(samples, cache_dir=_cache_dir())
    report.update({f"digits_{k}": v for k, v in score.items()})
  if "fid" in metrics:
    from ddpm_jax import fid_eval  # pylint: disable=g-import-not-at-top
    report.update(fid_eval.fid_and_is(config, workdir, samples))
  if "bpd" in metrics:
    report.update(bits_per_dim(config, model, tables, mesh, params))
  logging.info("Evaluation at step %d:\n%s", step, json.dumps(report, indent=2, default=str))
  if jax.process_index() == 0:
    path = epath.Path(workdir) / "eval" / f"step_{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
  return report


def _cache_dir() -> str:
  return os.environ.get("DDPM_JAX_CACHE", os.path.expanduser("~/.cache/ddpm_jax"))


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=eval`: loads the newest checkpoint and runs `quality_report` on it."""
  mesh, model, tables = _setup(config)
  if "bpd" in config.eval.metrics:
    input_pipeline.validate_data_config(config)
  if "fid" in config.eval.metrics:
    from ddpm_jax import fid_eval  # pylint: disable=g-import-not-at-top
    fid_eval.check_inception_weights(config)
    input_pipeline.validate_data_config(config)
  params, step = _load_params(config, workdir, mesh, model)
  return quality_report(config, workdir, params, mesh, model, tables, step)
