"""The sampling service: compiled, sharded samplers and batched drawing.

Every driver draws through it: the train loop (periodic grids, final report), `drivers`
(`--mode=sample|eval|edit`) and the sweeps; it imports none of them. Samplers run under
`jax.jit` with the batch sharded over every device (the model input is constrained to the mesh's
`data` axis, and XLA partitions the whole loop); the noise is drawn at the global shape, so a
seed gives the same samples on 1 or N devices.
"""

import grain
import jax
import numpy as np

from ddpm_jax.config import conditioning
from ddpm_jax.config import factories
from ddpm_jax.core import degradations
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import autoguidance
from ddpm_jax.evaluation import classifier_guidance
from ddpm_jax.evaluation import images
from ddpm_jax.runtime import mesh as mesh_lib


def make_sample_fn(config, model, tables, mesh, sample, *, classifier=None, guide=None,
                   sampler_name=None, label: int | None = None, low_res_bank=None):
  """Returns `fn(params, rng, n, low_res=None) -> (float samples [n, H, W, C], trajectory)` on
  the host.

  Args:
    config: reads data (the image shape), the conditioning and guidance fields of `sampling`.
    model: the Flax module whose `apply` is the denoiser.
    tables: the schedule's tables (classifier guidance needs them).
    mesh: the 1-D device mesh; every sample batch is sharded over its `data` axis.
    sample: a sampler from `factories.sampler_from_config`.
    classifier: (module, params) of classifier guidance (`classifier_guidance.load`), or None.
    guide: (GuideRun, module, params) of autoguidance (`autoguidance.load`), or None.
    sampler_name: the name `sample` was built from, when not `sampling.sampler` (classifier
      guidance shifts the mean for 'ancestral', eps otherwise).
    label: the class of every sample of a conditional model, or -1 for one of each in turn;
      default sampling.class_label.

  `sample(model_fn, rng, shape) -> (x0, trajectory)` may be any function of that form, e.g. an
  editing method closed over its inputs (`drivers.edit`).

  A super-resolution stage (model.sr_factor = f > 0) upsamples `low_res` [n, H/f, W/f, C] in
  [-1, 1]: it gets Gaussian noise of std sampling.cond_aug (drawn from `rng` at the global shape)
  and the model sees it bilinearly upsampled with that level. Without `low_res`, n rows of
  `low_res_bank` are drawn by `rng` (the training grids and final scores condition on held-out
  images); with neither it is an error.
  """
  sharding = mesh_lib.batch_sharding(mesh)
  d = config.data
  compiled = {}
  classifier_params = None if classifier is None else classifier[1]
  # Both are jit arguments, so their params are not baked into the executable as constants.
  extra_params = (classifier_params, None if guide is None else guide[2])
  sampler_name = sampler_name or config.sampling.sampler
  sr_factor = int(config.model.get("sr_factor", 0))
  cond_aug = float(config.sampling.get("cond_aug", 0.0))

  def sr_inputs(rng, low_res):
    """The model's extra inputs: {} or the upsampled, augmented low-res batch and its level."""
    if low_res is None:
      return {}
    low = low_res + cond_aug * jax.random.normal(jax.random.fold_in(rng, 0xC0D), low_res.shape)
    up = jax.lax.with_sharding_constraint(degradations.upsample_bilinear(low, sr_factor),
                                          sharding)
    return {"cond": up, "cond_level": cond_aug}

  def run(params, rng, shape, extra_params, low_res):
    classifier_params, guide_params = extra_params
    sr = sr_inputs(rng, low_res)
    def cond_fn(x, t, y):
      x = jax.lax.with_sharding_constraint(x, sharding)
      net_fn = lambda x_, t_: model.apply({"params": params}, x_, t_, y, train=False, **sr)
      return factories.sampler_model_fn(config, tables, net_fn)(x, t)
    # sampling.class_label / guidance_scale of a class-conditional model (see `conditioning`).
    model_fn = conditioning.guided_model_fn(config, cond_fn, shape[0], label)
    if classifier is not None:
      model_fn = classifier_guidance.wrap(config, model_fn, tables, classifier[0],
                                          classifier_params, shape[0], sampler_name)
    if guide is not None:
      model_fn = autoguidance.wrap(config, model_fn, tables, guide[0], guide[1], guide_params,
                                   shape[0], label)
    x0, traj = sample(model_fn, rng, shape)
    # Sharded over the batch, so each process can keep its own rows (`fn.local`).
    return jax.lax.with_sharding_constraint(x0, sharding), traj

  def padded_size(n):
    return -(-n // jax.device_count()) * jax.device_count()

  def low_res_of(rng, n, low_res):
    """The padded low-res batch of a super-resolution stage (None for any other model)."""
    if sr_factor <= 0:
      if low_res is not None:
        raise ValueError("a low-resolution input given to a model that is not a "
                         "super-resolution stage (model.sr_factor = 0)")
      return None
    h = d.image_size // sr_factor
    if low_res is None:
      if low_res_bank is None:
        raise ValueError(f"This super-resolution stage (model.sr_factor={sr_factor}) needs its "
                         f"low-resolution input: [n, {h}, {h}, {d.num_channels}] images, e.g. "
                         "--config.sampling.low_res_input=low.npz, or --mode=cascade.")
      rows = jax.random.randint(jax.random.fold_in(rng, 0xBA4C), (n,), 0, len(low_res_bank))
      low_res = np.asarray(low_res_bank)[np.asarray(rows)]
    low_res = np.asarray(low_res, np.float32)
    if low_res.shape != (n, h, h, d.num_channels):
      raise ValueError(f"The low-resolution input is {low_res.shape[1:]}, the stage takes "
                       f"{(h, h, d.num_channels)} (data.image_size / model.sr_factor).")
    pad = padded_size(n) - n
    return np.concatenate([low_res, np.repeat(low_res[-1:], pad, axis=0)])

  def executable(params, rng, n, low_res=None):
    """The compiled sampler for `n` samples (padded to a multiple of the device count)."""
    shape = (padded_size(n), d.image_size, d.image_size, d.num_channels)
    if shape not in compiled:
      compiled[shape] = jax.jit(lambda p, r, c, lr: run(p, r, shape, c, lr)).lower(
          params, rng, extra_params, low_res).compile()
    return compiled[shape]

  def draw(params, rng, n, low_res=None):
    """(the global, batch-sharded samples with padding rows, the trajectory on the host)."""
    low_res = low_res_of(rng, n, low_res)
    x0, traj = executable(params, rng, n, low_res)(params, rng, extra_params, low_res)
    return x0, None if traj is None else {k: mesh_lib.to_host(v) for k, v in traj.items()}

  def fn(params, rng, n, low_res=None):
    x0, traj = draw(params, rng, n, low_res)
    return mesh_lib.to_host(x0)[:n], traj

  def local(params, rng, n, low_res=None):
    """(this process's samples, their indices in 0..n-1, trajectory): no sample crosses hosts."""
    x0, traj = draw(params, rng, n, low_res)
    rows, index = mesh_lib.local_rows(x0)
    keep = index < n  # the padding rows
    return rows[keep], index[keep], traj

  # Compiles without sampling, e.g. to time sampling alone.
  fn.compile = lambda params, rng, n: executable(params, rng, n, low_res_of(rng, n, None))
  fn.local = local
  return fn


def low_res_bank(config, limit: int = 256) -> np.ndarray | None:
  """A super-resolution stage's default inputs: the first `limit` images of the eval split,
  average pooled by model.sr_factor, the same on every host; None for any other model."""
  f = int(config.model.get("sr_factor", 0))
  if f <= 0:
    return None
  whole = grain.sharding.ShardOptions(shard_index=0, shard_count=1, drop_remainder=False)
  batch = next(iter(input_pipeline.create_eval_iterator(config, batch_size=limit,
                                                        shard_options=whole)))
  return np.asarray(degradations.super_resolution(f).A(batch["image"][batch["mask"]]))


def _low_res_rows(low_res, start: int, n: int) -> tuple:
  """The extra argument of a super-resolution stage's batch; none for any other sampler."""
  return () if low_res is None else (low_res[start:start + n],)


def draw_samples(config, sample_fn, params, num_samples: int, first_batch_fn=None,
                 low_res=None):
  """`num_samples` uint8 samples in global batches of `sampling.batch_size`, one rng per batch,
  gathered whole onto every host (see `draw_local_samples` for each host's own share).

  `first_batch_fn` (a sampler that records its trajectory) draws the first batch, if given;
  its trajectory is returned, so only one batch pays for recording and gathering it.
  `low_res`: a super-resolution stage's inputs, one per sample (default: its bank).
  """
  rng = jax.random.PRNGKey(config.sampling.seed)
  out, traj = [], None
  for i in range(-(-num_samples // config.sampling.batch_size)):
    n = min(config.sampling.batch_size, num_samples - i * config.sampling.batch_size)
    fn = first_batch_fn if (i == 0 and first_batch_fn is not None) else sample_fn
    x0, t = fn(params, jax.random.fold_in(rng, i), n,
               *_low_res_rows(low_res, i * config.sampling.batch_size, n))
    out.append(images.to_uint8(x0))
    traj = t if i == 0 else traj
  return np.concatenate(out), traj


def draw_local_samples(config, sample_fn, params, num_samples: int, first_batch_fn=None,
                       low_res=None):
  """`draw_samples`, each process keeping only the samples its devices drew.

  Returns:
    (uint8 samples [n_p, H, W, C], their indices among the `num_samples`, trajectory): the
    processes' shares are disjoint, their union is exactly `draw_samples`' array (row i of it is
    the sample with index i), and no host holds more than its share.
  """
  rng = jax.random.PRNGKey(config.sampling.seed)
  batch = config.sampling.batch_size
  out, index, traj = [], [], None
  for i in range(-(-num_samples // batch)):
    n = min(batch, num_samples - i * batch)
    fn = first_batch_fn if (i == 0 and first_batch_fn is not None) else sample_fn
    x0, idx, t = fn.local(params, jax.random.fold_in(rng, i), n,
                          *_low_res_rows(low_res, i * batch, n))
    out.append(images.to_uint8(x0))
    index.append(i * batch + idx)
    traj = t if i == 0 else traj
  return np.concatenate(out), np.concatenate(index), traj
