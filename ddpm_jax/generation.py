"""The sampling service shared by both drivers: compiled, sharded samplers and batched drawing.

`train.py` (periodic grids, final report) and `evaluate.py` (`--mode=sample|eval`) both sit above
this module; it imports neither. Samplers run under `jax.jit` with the batch sharded over every
device (the model input is constrained to the mesh's `data` axis, and XLA partitions the whole
loop); the noise is drawn at the global shape, so a seed gives the same samples on 1 or N devices.
"""

import jax
from jax.experimental import multihost_utils
import numpy as np

from ddpm_jax import classifier_guidance
from ddpm_jax import conditioning
from ddpm_jax import config_lib
from ddpm_jax import diffusion
from ddpm_jax import images
from ddpm_jax import sampling
from ddpm_jax import train_step as train_step_lib


def to_host(x) -> np.ndarray:
  """A (possibly sharded, multi-process) array gathered whole onto every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_sample_fn(config, model, tables, mesh, *, sampler=None, num_steps=None,
                   trajectory_every=0):
  """Returns `fn(params, rng, n) -> (uint8-ready float samples [n, H, W, C], trajectory)` on host."""
  sample = config_lib.sampler_from_config(config, tables, sampler=sampler, num_steps=num_steps,
                                          trajectory_every=trajectory_every)
  sharding = train_step_lib.batch_sharding(mesh)
  d = config.data
  compiled = {}
  # sampling.classifier_workdir: (module, params) of a noisy classifier, or None.
  classifier = classifier_guidance.load(config, mesh)
  classifier_params = None if classifier is None else classifier[1]

  def run(params, rng, shape, classifier_params):
    def cond_fn(x, t, y):
      x = jax.lax.with_sharding_constraint(x, sharding)
      return model.apply({"params": params}, x, t, y, train=False)
    # sampling.class_label / guidance_scale of a class-conditional model (see `conditioning`).
    model_fn = conditioning.guided_model_fn(config, cond_fn, shape[0])
    if classifier is not None:
      model_fn = classifier_guidance.wrap(config, model_fn, tables, classifier[0],
                                          classifier_params, shape[0],
                                          sampler or config.sampling.sampler)
    return sample(model_fn, rng, shape)

  def executable(params, rng, n):
    """The compiled sampler for `n` samples (padded to a multiple of the device count)."""
    padded = -(-n // jax.device_count()) * jax.device_count()
    shape = (padded, d.image_size, d.image_size, d.num_channels)
    if shape not in compiled:
      compiled[shape] = jax.jit(lambda p, r, c: run(p, r, shape, c)).lower(
          params, rng, classifier_params).compile()
    return compiled[shape]

  def fn(params, rng, n):
    x0, traj = executable(params, rng, n)(params, rng, classifier_params)
    traj = None if traj is None else {k: to_host(v) for k, v in traj.items()}
    return to_host(x0)[:n], traj

  fn.compile = executable  # compiles without sampling, e.g. to time sampling alone
  return fn


def draw_samples(config, sample_fn, params, num_samples: int, first_batch_fn=None):
  """`num_samples` uint8 samples in global batches of `sampling.batch_size`, one rng per batch.

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


def sampler_steps(config) -> int:
  """Grid points of the configured sampler: ancestral takes all T unless it learns its variance."""
  s, d = config.sampling, config.diffusion
  if s.sampler == "ancestral" and d.model_var not in diffusion.LEARNED_VARS:
    return d.num_timesteps
  return s.num_steps


def sampler_nfe(config) -> int:
  """Model evaluations per sample of the configured sampler (Heun: 2N - 1)."""
  return sampling.nfe(config.sampling.sampler, sampler_steps(config))


def sampler_label(config) -> str:
  """e.g. 'ddim_50', or 'ancestral_1000': the sampler and its grid points (not its NFE)."""
  return f"{config.sampling.sampler}_{sampler_steps(config)}"
