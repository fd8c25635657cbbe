"""The train state pytree, its optimiser, and how it is created already replicated on a mesh."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from ddpm_jax.core import losses
from ddpm_jax.core import posthoc_ema
from ddpm_jax.runtime import sharding


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs besides the data iterator.

  `rng` is a raw uint32 key (not a typed key) so that Orbax stores it like any array.
  `importance` holds the per-t loss history when timesteps are importance-sampled, else None.
  `phema` holds the power-function EMAs of post-hoc EMA (EDM2; `training.phema_sigma_rels`), one
  param tree per sigma_rel, else None; `phema_gammas` (static, like `tx`) are their exponents.
  """

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray
  importance: losses.ImportanceState | None
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  phema: tuple[Any, ...] | None = None
  phema_gammas: tuple[float, ...] = flax.struct.field(pytree_node=False, default=())

  def apply_gradients(self, grads, ema_decay: float) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    # EMA inside the step, so it is donated and sharded like the params.
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, self.ema_params, params)
    step = self.step + 1
    phema = self.phema
    if phema is not None:
      # ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t at t = the new step count (t = 1: params).
      t = step.astype(jnp.float32)
      phema = tuple(posthoc_ema.update(e, params, t, g) for e, g in zip(phema, self.phema_gammas))
    return self.replace(step=step, params=params, ema_params=ema, opt_state=opt_state,
                        phema=phema)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant (DDPM).

  `warmup_steps=0` means no warm-up: the full `lr` from step 0.
  """
  if int(optim.warmup_steps) <= 0:
    return optax.constant_schedule(optim.lr)
  return optax.linear_schedule(0.0, optim.lr, int(optim.warmup_steps))


def make_optimizer(optim: ml_collections.ConfigDict,
                   clip: bool = True) -> optax.GradientTransformation:
  """Adam with global-norm clipping; the optax chain owns the learning-rate schedule.

  `clip=False` leaves the clipping out: a sharded state's step clips by the norm over every
  device's shards itself (`runtime.sharding.global_norm`), which optax cannot see.
  """
  parts = []
  if optim.grad_clip > 0:
    # Without `clip`, a stand-in with clip_by_global_norm's (empty) state keeps the optimiser
    # state's structure, so that replicated and sharded checkpoints restore into each other.
    parts.append(optax.clip_by_global_norm(optim.grad_clip) if clip else
                 optax.GradientTransformation(optax.init_empty_state,
                                              lambda updates, state, params=None: (updates, state)))
  parts.append(optax.adam(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps))
  return optax.chain(*parts)


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1):
  d = config.data
  return (jnp.zeros((batch, d.image_size, d.image_size, d.num_channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32))


def phema_gammas(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The power-EMA exponents of `training.phema_sigma_rels` (() when post-hoc EMA is off)."""
  return tuple(posthoc_ema.gamma_from_sigma_rel(float(s))
               for s in config.training.get("phema_sigma_rels", ()))


def phema_copies(params, n: int) -> tuple[Any, ...] | None:
  """`n` copies of `params`, each its own buffers (the step donates the state), or None if n = 0."""
  return tuple(jax.tree.map(jnp.copy, params) for _ in range(n)) if n else None


def shard_state(config: ml_collections.ConfigDict) -> bool:
  """Whether the run keeps its state sharded over the mesh (`training.shard_state`)."""
  return bool(config.training.get("shard_state", False))


def state_specs(config: ml_collections.ConfigDict, state, mesh: Mesh):
  """The PartitionSpec tree of a TrainState (or its shapes) on `mesh` (`runtime.sharding`)."""
  return sharding.state_specs(state, mesh.size, shard_state(config))


def create_train_state(config: ml_collections.ConfigDict, model, mesh: Mesh) -> TrainState:
  """Initialises the state inside jit, so every array is created already in place on `mesh`:
  replicated, or with `training.shard_state` each large leaf split over the devices."""
  tx = make_optimizer(config.optim, clip=not shard_state(config))
  num_timesteps = config.diffusion.num_timesteps
  use_importance = config.diffusion.t_sampling == "importance"
  gammas = phema_gammas(config)

  def init(rng):
    rng, init_rng, dropout_rng = jax.random.split(rng, 3)
    x, t = dummy_inputs(config)
    params = model.init({"params": init_rng, "dropout": dropout_rng}, x, t, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), rng=rng,
        importance=losses.init_importance_state(num_timesteps) if use_importance else None, tx=tx,
        phema=phema_copies(params, len(gammas)), phema_gammas=gammas)

  key = jax.random.PRNGKey(config.training.seed)
  specs = state_specs(config, jax.eval_shape(init, key), mesh)
  return jax.jit(init, out_shardings=sharding.named(mesh, specs))(key)


def abstract_params(config: ml_collections.ConfigDict, model, mesh: Mesh):
  """`jax.eval_shape` of the model's params, replicated on `mesh`: a restore target, no FLOPs."""
  x, t = dummy_inputs(config)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  shapes = jax.eval_shape(lambda: model.init(rngs, x, t, train=False)["params"])
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
