"""The sampling service: compiled, sharded samplers and batched drawing.

Every driver draws through it: the train loop (periodic grids, final report), `drivers`
(`--mode=sample|eval|edit`) and the sweeps; it imports none of them. Samplers run under
`jax.jit` with the batch sharded over every device (the model input is constrained to the mesh's
`data` axis, and XLA partitions the whole loop); the noise is drawn at the global shape, so a
seed gives the same samples on 1 or N devices.
"""

import jax
import numpy as np

from ddpm_jax.config import conditioning
from ddpm_jax.config import factories
from ddpm_jax.evaluation import autoguidance
from ddpm_jax.evaluation import classifier_guidance
from ddpm_jax.evaluation import images
from ddpm_jax.runtime import mesh as mesh_lib


def make_sample_fn(config, model, tables, mesh, sample, *, classifier=None, guide=None,
                   sampler_name=None, label: int | None = None):
  """Returns `fn(params, rng, n) -> (float samples [n, H, W, C], trajectory)` on the host.

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
  """
  sharding = mesh_lib.batch_sharding(mesh)
  d = config.data
  compiled = {}
  classifier_params = None if classifier is None else classifier[1]
  # Both are jit arguments, so their params are not baked into the executable as constants.
  extra_params = (classifier_params, None if guide is None else guide[2])
  sampler_name = sampler_name or config.sampling.sampler

  def run(params, rng, shape, extra_params):
    classifier_params, guide_params = extra_params
    def cond_fn(x, t, y):
      x = jax.lax.with_sharding_constraint(x, sharding)
      net_fn = lambda x_, t_: model.apply({"params": params}, x_, t_, y, train=False)
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

  def executable(params, rng, n):
    """The compiled sampler for `n` samples (padded to a multiple of the device count)."""
    padded = -(-n // jax.device_count()) * jax.device_count()
    shape = (padded, d.image_size, d.image_size, d.num_channels)
    if shape not in compiled:
      compiled[shape] = jax.jit(lambda p, r, c: run(p, r, shape, c)).lower(
          params, rng, extra_params).compile()
    return compiled[shape]

  def draw(params, rng, n):
    """(the global, batch-sharded samples with padding rows, the trajectory on the host)."""
    x0, traj = executable(params, rng, n)(params, rng, extra_params)
    return x0, None if traj is None else {k: mesh_lib.to_host(v) for k, v in traj.items()}

  def fn(params, rng, n):
    x0, traj = draw(params, rng, n)
    return mesh_lib.to_host(x0)[:n], traj

  def local(params, rng, n):
    """(this process's samples, their indices in 0..n-1, trajectory): no sample crosses hosts."""
    x0, traj = draw(params, rng, n)
    rows, index = mesh_lib.local_rows(x0)
    keep = index < n  # the padding rows
    return rows[keep], index[keep], traj

  fn.compile = executable  # compiles without sampling, e.g. to time sampling alone
  fn.local = local
  return fn


def draw_samples(config, sample_fn, params, num_samples: int, first_batch_fn=None):
  """`num_samples` uint8 samples in global batches of `sampling.batch_size`, one rng per batch,
  gathered whole onto every host (see `draw_local_samples` for each host's own share).

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


def draw_local_samples(config, sample_fn, params, num_samples: int, first_batch_fn=None):
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
    x0, idx, t = fn.local(params, jax.random.fold_in(rng, i), n)
    out.append(images.to_uint8(x0))
    index.append(i * batch + idx)
    traj = t if i == 0 else traj
  return np.concatenate(out), np.concatenate(index), traj
