"""The data-parallel train step: pmap-style per-device code run by `jax.shard_map` under `jax.jit`.

Params, EMA, optimiser state and RNG are replicated (or, with `training.shard_state`, the large
leaves split over the devices: `runtime.sharding`); the batch is split over the mesh's `data`
axis, which spans every device of every host. The step runs under shard_map's default
varying-manual-axes check (`check_vma=True`): the state is *invariant* over `data`, the batch
*varying*. Differentiating a device's loss with respect to invariant params transposes their
implicit invariant -> varying cast into a `psum` over `data`, so the gradient arrives already
summed over devices; each device therefore differentiates its share of the global mean,
mean_local / N, and no further `pmean` of the gradient is taken (one would count it N times).

Randomness is drawn per *example*, from `fold_in(fold_in(rng, step), global_example_index)`, so each
device gets its own keys and yet the timesteps and noise of an example do not depend on how many
devices share the batch: 1 and N devices train the same model (up to float summation order).
Dropout masks are the exception: Flax draws them per device, from `fold_in(dropout_rng, device)`.
"""

from collections.abc import Callable

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import optax

from ddpm_jax.core import degradations
from ddpm_jax.core import losses
from ddpm_jax.runtime import sharding
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.runtime.mesh import AXIS


def all_finite(*trees) -> jnp.ndarray:
  """One bool: every leaf of every tree is finite (no NaN, no +-inf)."""
  leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_train_step(*, apply_fn: Callable, loss_fn: Callable, num_timesteps: int,
                    t_sampling: str, ema_decay: float, learning_rate: optax.Schedule,
                    mesh: Mesh, skip_nonfinite: bool = False, num_classes: int = 0,
                    p_uncond: float = 0.0, labels_to_loss: bool = False,
                    sr_factor: int = 0, cond_aug_max: float = 0.0,
                    draw_level: Callable | None = None, state_specs=None,
                    grad_clip: float = 0.0) -> Callable:
  """Returns `step(state, batch) -> (state, metrics)`, jitted, with the state donated.

  `batch` holds 'image' [B, H, W, C] and 'preempt' [num_devices] bool, both sharded over `data`.

  Args:
    apply_fn: the Flax module's `apply`.
    loss_fn: `loss_fn(model_fn, x0, t, noise) -> (per_example_loss, aux)` from `losses`; t is
      the example's noise level: DDPM's integer index, or what `draw_level` draws.
    num_timesteps: T.
    t_sampling: 'uniform' or 'importance' (the state then carries an `ImportanceState`).
    ema_decay: decay of the EMA of the params, updated every step.
    learning_rate: the optimiser's schedule, only read for logging.
    mesh: the 1-D device mesh with axis `data`.
    skip_nonfinite: keep the old state (step count aside) when the update is non-finite,
      instead of letting the caller stop the run.
    num_classes: K > 0 trains a class-conditional model on `batch['label']` (int32 [B]); each
      label is replaced by the null class K with probability `p_uncond` (classifier-free
      guidance, Ho & Salimans 2022), drawn from the example's own key like t and the noise.
    p_uncond: the label-drop probability.
    labels_to_loss: the loss, not the model, takes the labels: `loss_fn(model_fn, x0, t, noise,
      batch['label'])` (the noise-conditional classifier, `losses.get_classifier_loss_fn`).
    sr_factor, cond_aug_max: a super-resolution stage (f > 0) sees each example's x f average
      pooled image plus Gaussian noise of std a ~ U[0, cond_aug_max], bilinearly upsampled,
      with the level a (conditioning augmentation, Ho et al. 2022, sec. 3.2); a and the noise
      come from two more keys of the example (fold_in 3 and 4).
    draw_level: `draw_level(key) -> (level, weight)`, the continuous noise level of an EDM
      (sigma) or flow-matching (t) example (`losses.noise_level_sampler`); None draws DDPM's
      integer t with `t_sampling`.
    state_specs: the state's PartitionSpec tree for a sharded state (FSDP, `runtime.sharding`):
      the forward and backward passes all-gather the sharded params, the gradient arrives as
      each device's shard (reduce-scattered), and the update runs on the shards. None: the
      state is replicated.
    grad_clip: with a sharded state, the global-norm clip that the step applies itself (the
      optimiser then has none, `train_state.make_optimizer(clip=False)`); 0 = none.

  `metrics["finite"]` is 1 when the loss, the gradient norm and the *updated* params and EMA are
  all finite, else 0; all four are invariant over `data` (reduced over every device of every
  host), so every device computes the same flag. With
  `skip_nonfinite`, `metrics["skipped"]` counts the steps whose update was dropped.
  """

  def per_device_step(state: train_state_lib.TrainState, batch: dict):
    x0 = batch["image"]
    local_batch = x0.shape[0]
    example_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    device = lax.axis_index(AXIS)
    example_ids = device * local_batch + jnp.arange(local_batch)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(example_rng, example_ids)
    t_keys, noise_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 2))(keys), 1, 0)

    if draw_level is None:
      t, weights = jax.vmap(
          lambda k: losses.sample_timesteps(k, 1, num_timesteps, t_sampling, state.importance)
      )(t_keys)
      t, weights = t[:, 0], weights[:, 0]
    else:
      t, weights = jax.vmap(draw_level)(t_keys)
    noise = jax.vmap(lambda k, x: jax.random.normal(k, x.shape, x.dtype))(noise_keys, x0)
    dropout_rng = jax.random.fold_in(dropout_rng, device)
    y = None
    if num_classes > 0:
      # A third key per example (fold_in, so t and the noise are those of an unconditional run).
      drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), p_uncond))(keys)
      y = jnp.where(drop, num_classes, batch["label"].astype(jnp.int32))
    sr = {}
    if sr_factor > 0:
      sr = sr_condition(x0, keys, sr_factor, cond_aug_max)

    def objective(params):
      if sharded:  # the full params, gathered; autodiff reduce-scatters their gradient
        params = sharding.gather(params, state_specs.params)

      def model_fn(x_t, t_):
        # y only for a conditional model: the classifier's apply takes (x_t, t) alone.
        return apply_fn({"params": params}, x_t, t_, *(() if y is None else (y,)), train=True,
                        rngs={"dropout": dropout_rng}, **sr)
      labels = (batch["label"],) if labels_to_loss else ()
      per_example, aux = loss_fn(model_fn, x0, t, noise, *labels)
      local_mean = jnp.mean(weights * per_example)
      return local_mean / num_devices, (local_mean, per_example, aux)

    # `grads` is invariant: psum over `data` of d(mean_local / N) = the global-mean gradient.
    (_, (loss, per_example, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    if state_specs is not None:  # shard_state (on any device count): the step clips itself
      grad_norm = sharding.global_norm(grads, state_specs.params)
      if grad_clip > 0:  # as optax.clip_by_global_norm, with the norm over every shard
        grads = jax.tree.map(
            lambda g: lax.select(grad_norm < grad_clip, g, (g / grad_norm) * grad_clip), grads)
    else:
      grad_norm = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads, ema_decay)
    if state.importance is not None:
      # Every replica sees every (t, loss) pair, so the histories stay identical (invariant).
      all_t = _gather_invariant(t, device)
      all_losses = _gather_invariant(lax.stop_gradient(per_example), device)
      new_state = new_state.replace(
          importance=losses.update_importance_state(state.importance, all_t, all_losses))
    metrics = lax.pmean({"loss": loss, **{k: jnp.mean(v) for k, v in aux.items()}}, AXIS)
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = learning_rate(state.step)
    # Every input is invariant (reduced over `data`), so every device computes the same flag;
    # a sharded state's flag is its shards' flags reduced over `data`.
    finite = all_finite(metrics["loss"], metrics["grad_norm"], new_state.params,
                        new_state.ema_params).astype(jnp.int32)
    if sharded:
      finite = lax.pmin(finite, AXIS)
    metrics["finite"] = finite
    if skip_nonfinite:
      # The old state survives a bad step whole (params, EMA, moments, importance history);
      # only the step advances, so the next step draws fresh t and noise. One cond on the flag
      # rather than a select per leaf: the same values, and the step compiles about 2.5x faster
      # (a select per leaf took XLA:CPU 20 s to compile for the tiny test model, this 8 s).
      kept = state.replace(step=new_state.step)
      new_state = lax.cond(finite > 0, lambda: new_state, lambda: kept)
      metrics["finite"] = jnp.ones_like(finite)
      metrics["skipped"] = 1 - finite
    # A SIGTERM that a host's own handler saw (before jax.distributed took over, or with one
    # process) stops every host at the same step (see train.py and PreemptionGuard).
    metrics["preempt"] = lax.pmax(jnp.any(batch["preempt"]).astype(jnp.int32), AXIS)
    return new_state, metrics

  num_devices = mesh.shape[AXIS]
  sharded = state_specs is not None and sharding.any_sharded(state_specs.params)

  def _gather_invariant(x, device):
    """[local] per device -> the [N * local] concatenation, invariant over `data`: each device
    writes its block into zeros and a psum adds them (exact: every other term is 0)."""
    blocks = jnp.zeros((num_devices, *x.shape), x.dtype).at[device].set(x)
    return lax.psum(blocks, AXIS).reshape(num_devices * x.shape[0], *x.shape[1:])

  if not sharded:
    step = jax.shard_map(per_device_step, mesh=mesh, in_specs=(P(), P(AXIS)),
                         out_specs=(P(), P()))
    return jax.jit(step, donate_argnums=0)

  # The specs go in as a list over the state's leaves: a TrainState of specs would also carry
  # the optimiser (a static field), and shard_map wants the very same one as the state's.
  spec_leaves = jax.tree.leaves(state_specs, is_leaf=lambda x: isinstance(x, P))

  def sharded_step(state, batch):
    leaves, treedef = jax.tree.flatten(state)

    def per_device(leaves, batch):
      new_state, metrics = per_device_step(treedef.unflatten(leaves), batch)
      return jax.tree.leaves(new_state), metrics

    out, metrics = jax.shard_map(per_device, mesh=mesh, in_specs=(spec_leaves, P(AXIS)),
                                 out_specs=(spec_leaves, P()))(leaves, batch)
    return treedef.unflatten(out), metrics

  return jax.jit(sharded_step, donate_argnums=0)


def sr_condition(x0, keys, factor: int, aug_max: float) -> dict:
  """A super-resolution stage's inputs for images x0 [B, H, W, C] and per-example keys [B]:
  {'cond': upsample(pool(x0) + a n), 'cond_level': a}, a ~ U[0, aug_max], n ~ N(0, I)."""
  low = degradations.super_resolution(factor).A(x0)
  level = aug_max * jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3)))(keys)
  noise = jax.vmap(lambda k, v: jax.random.normal(jax.random.fold_in(k, 4), v.shape, v.dtype))(
      keys, low)
  low = low + level[:, None, None, None].astype(low.dtype) * noise
  return {"cond": degradations.upsample_bilinear(low, factor), "cond_level": level}


def from_config(config, model, loss_fn: Callable, mesh: Mesh, state=None) -> Callable:
  """The jitted data-parallel train step of a validated config (see `make_train_step`); with
  `training.shard_state`, `state` (the train state or its shapes) gives the sharding."""
  classifier = config.training.objective == "classifier"
  specs = None
  if train_state_lib.shard_state(config):
    if state is None:
      raise ValueError("training.shard_state: pass the train state, whose shapes fix the sharding")
    specs = train_state_lib.state_specs(config, state, mesh)
  return make_train_step(
      apply_fn=model.apply, loss_fn=loss_fn, num_timesteps=config.diffusion.num_timesteps,
      t_sampling=config.diffusion.t_sampling, ema_decay=config.training.ema_decay,
      learning_rate=train_state_lib.learning_rate_schedule(config.optim), mesh=mesh,
      skip_nonfinite=config.training.skip_nonfinite_updates,
      # The classifier's labels are its targets, not a model input.
      num_classes=0 if classifier else config.model.num_classes,
      p_uncond=config.training.p_uncond, labels_to_loss=classifier,
      sr_factor=0 if classifier else config.model.get("sr_factor", 0),
      cond_aug_max=float(config.training.get("cond_aug_max", 0.0)),
      draw_level=_level_sampler(config.diffusion), state_specs=specs,
      grad_clip=float(config.optim.grad_clip))


def _level_sampler(d) -> Callable | None:
  """EDM's or flow matching's noise-level draw; None for DDPM's integer t."""
  if d.parameterization == "ddpm":
    return None
  return losses.noise_level_sampler(d.parameterization, p_mean=d.p_mean, p_std=d.p_std,
                                    flow_t=d.flow_t, flow_t_mean=d.flow_t_mean,
                                    flow_t_std=d.flow_t_std)
