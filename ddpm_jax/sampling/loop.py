"""The loop every sampler shares, and the x0 / eps prediction at a fractional noise level.

State convention: x is always in the VP coordinates of the schedule, x_t = alpha x0 + s eps with
alpha = sqrt(abar(t)), s = sqrt(1 - abar(t)); the sigma-space samplers convert with
x_VE = x / alpha, sigma = s / alpha (Karras et al. 2022, eq. 4 with s(t) = alpha).

Randomness is tied to the global array shape, never to a device: x_T ~ N(0, I) is drawn from
`rng` with the full shape and the noise of step i from `jax.random.fold_in(rng, i)`. With JAX's
partitionable threefry this makes the samples identical however the batch is sharded.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import diffusion
from ddpm_jax.core import noise_levels

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
PostStep = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]


class Levels(NamedTuple):
  """Noise levels at the grid points and at the point after each (float64 numpy, [N]).

  t: the timestep indices; sigma: sqrt((1 - abar) / abar) (inf where abar = 0); alpha, s: the
  VP coefficients. The *_next arrays end with clean data: t = -1, sigma = 0, alpha = 1, s = 0.
  """
  t: np.ndarray
  sigma: np.ndarray
  alpha: np.ndarray
  s: np.ndarray
  t_next: np.ndarray
  sigma_next: np.ndarray
  alpha_next: np.ndarray
  s_next: np.ndarray


def levels(tables, grid: np.ndarray) -> Levels:
  """The levels of `grid` and the next points (`noise_levels.sigma_at`, then `vp_from_sigma`)."""
  t = np.asarray(grid, np.float64)
  t_next = np.append(t[1:], -1.0)
  sig, sig_next = noise_levels.sigma_at(tables, t), noise_levels.sigma_at(tables, t_next)
  return Levels(t, sig, *noise_levels.vp_from_sigma(sig), t_next, sig_next,
                *noise_levels.vp_from_sigma(sig_next))


def predict(model_out, x, alpha, s, model_output: str, model_var: str, clip_x0: bool):
  """(x0_hat, eps_hat) from the raw output at VP coefficients alpha, s (scalars).

  `noise_levels.x0_eps_from_output` on the prediction channels (a learned variance's channels are
  split off and unused); with `clip_x0`, x0_hat is clipped to [-1, 1] and eps_hat recomputed.
  """
  pred, _ = diffusion.split_model_output(model_out, model_var)
  return noise_levels.x0_eps_from_output(pred, x, alpha, s, model_output, clip_x0)


class Stepper(NamedTuple):
  """One sampler on a grid.

  `step(i, x, aux, model_out, key, model_fn) -> (x_next, aux, pred_x0)` is step i from grid
  point i to the next one; `model_out` is model_fn at (x, t_i); samplers that need more model
  calls per step (Heun) make them with `model_fn`. `aux` is carried state (past predictions).
  """
  grid: np.ndarray
  init_aux: Callable[[jnp.ndarray], Any]
  step: Callable[..., tuple[jnp.ndarray, Any, jnp.ndarray]]


def run(make_stepper: Callable[[np.ndarray], Stepper], grid: np.ndarray, trajectory_every: int,
        tables):
  """sample_fn(model_fn, rng, shape, *, x_start, t_start, post_step) over `grid`."""
  every = trajectory_every

  def sample_fn(model_fn: ModelFn, rng: jax.Array, shape, *, x_start=None, t_start=None,
                post_step: PostStep | None = None):
    shape = tuple(shape)
    g = np.asarray(grid, np.float64)
    if t_start is not None:
      t_start = float(t_start)
      if not 0 <= t_start <= tables.num_timesteps - 1:
        raise ValueError(f"t_start must be in [0, {tables.num_timesteps - 1}], got {t_start}.")
      g = np.concatenate([[t_start], g[g < t_start]])
    if (x_start is None) != (t_start is None):
      raise ValueError("x_start and t_start go together (SDEdit: start from x_start at t_start).")
    stepper = make_stepper(g)
    g = np.asarray(stepper.grid, np.float64)  # EDM's stochastic sampler visits sigma_hat.
    n = g.size
    first = (n - 1) % every if every else 0
    num_records = (n - 1) // every + 1 if every else 0
    t_next_all = np.append(g[1:], -1.0)
    x = (jax.random.normal(rng, shape, jnp.float32) if x_start is None
         else jnp.asarray(x_start, jnp.float32))
    traj = None
    if every:
      traj = {"x_t": jnp.zeros((num_records,) + shape, x.dtype),
              "pred_x0": jnp.zeros((num_records,) + shape, x.dtype)}
    ts = jnp.asarray(g, jnp.float32)
    ts_next = jnp.asarray(t_next_all, jnp.float32)

    def body(i, carry):
      x, aux, traj = carry
      t = jnp.full(shape[:1], ts[i], jnp.float32)
      # The state stays float32 even if the network computes (and returns) bf16.
      model_out = model_fn(x, t).astype(x.dtype)
      key = jax.random.fold_in(rng, i)
      x_next, aux, pred_x0 = stepper.step(i, x, aux, model_out, key, model_fn)
      if post_step is not None:
        x_next = post_step(i, x_next, ts_next[i], jax.random.fold_in(key, 1))
      if traj is not None:
        k = jnp.clip((i - first) // every, 0, num_records - 1)
        keep = (i >= first) & ((i - first) % every == 0)
        new = {"x_t": x, "pred_x0": pred_x0}
        traj = {name: buf.at[k].set(jnp.where(keep, new[name], buf[k]))
                for name, buf in traj.items()}
      return x_next, aux, traj

    x, _, traj = jax.lax.fori_loop(0, n, body, (x, stepper.init_aux(x), traj))
    if traj is not None:
      traj["t"] = jnp.asarray(g[first::every], jnp.float32)
    return x, traj

  return sample_fn
