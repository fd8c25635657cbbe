"""`--mode=sample` and `--mode=eval`: the two drivers that load a checkpoint without training.

The sampling service lives in `generation.py` and the metrics report in `quality.py`, below both
this module and `train.py`.
"""

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import generation
from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import quality
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import train_step as train_step_lib


def _setup(config):
  config_lib.validate_config(config, check_data=False)
  mesh = train_step_lib.make_mesh()
  model = models.create_model(config)
  tables = config_lib.tables_from_config(config)
  return mesh, model, tables


def _load_params(config, workdir, mesh, model):
  """Restores only the (EMA) params, against `jax.eval_shape` of the model's init.

  No optimiser or importance state is built, so e.g. --config.optim.grad_clip=0 or
  --config.diffusion.t_sampling=importance work on any run; a change of the params' shapes fails
  naming the config fields that differ from the run's config.json.
  """
  abstract = train_state_lib.abstract_params(config, model, mesh)
  arch = {}
  if (epath.Path(workdir) / "config.json").exists():
    from ddpm_jax import run_config  # pylint: disable=g-import-not-at-top
    latest = run_config.segment_config(workdir, 1 << 62) or {}
    arch = run_config.architecture_fields(run_config.differences(latest, run_config._flat(config)))  # pylint: disable=protected-access
  hint = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in arch.items())
  params, step = checkpointing.restore_params(workdir, abstract, use_ema=config.sampling.use_ema,
                                              hint=hint)
  logging.info("Loaded %s params of step %d from %s.", "EMA" if config.sampling.use_ema else "raw",
               step, workdir)
  return params, step


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `samples/<sampler>_<steps>.npz` (uint8), a PNG grid and a trajectory figure."""
  mesh, model, tables = _setup(config)
  params, step = _load_params(config, workdir, mesh, model)
  s = config.sampling
  sample_fn = generation.make_sample_fn(config, model, tables, mesh)
  traj_fn = generation.make_sample_fn(config, model, tables, mesh,
                                      trajectory_every=s.trajectory_every)
  samples, traj = generation.draw_samples(config, sample_fn, params, s.num_samples,
                                          first_batch_fn=traj_fn)
  label = generation.sampler_label(config)
  if config.model.get("num_classes", 0) > 0:  # e.g. ddim_50_class3_w1.0 (class -1: all)
    label += f"_class{s.class_label}_w{s.guidance_scale}"
  if s.get("classifier_workdir", ""):  # classifier guidance, e.g. ..._class3_cg2.0
    label += ("" if config.model.get("num_classes", 0) > 0 else f"_class{s.class_label}") + \
        f"_cg{s.classifier_scale}"
  stem = epath.Path(workdir) / "samples" / f"{label}_step{step}"
  path = stem.parent / f"{stem.name}.npz"  # not with_suffix: "_w1.0_step4" has a dot
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      np.savez_compressed(f, samples=samples)
    scale = max(1, 128 // config.data.image_size)
    images.save_png(stem.parent / f"{stem.name}.png", images.make_grid(samples[:100]), scale=scale)
    if traj is not None:
      images.save_trajectory_figure(stem.parent / f"{stem.name}_trajectory.png", traj)
  logging.info("Wrote %d samples to %s.", len(samples), path)
  return str(path)


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
  return quality.quality_report(config, workdir, params, mesh, model, tables, step)
