"""Samplers in the VP parametrisation: ancestral (DDPM / respaced Improved DDPM) and DDIM."""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import diffusion
from ddpm_jax.core import schedules
from ddpm_jax.sampling import loop


def respaced_tables(tables, grid: np.ndarray):
  """Tables of the respaced process on the integer `grid` (Improved DDPM, sec. 4).

  With the visited indices k_0 < ... < k_{K-1}: beta'_j = 1 - abar_{k_j} / abar_{k_{j-1}}
  (abar_{k_{-1}} = 1), and every table (posterior variance, its log, the means) is made from
  beta'. A learned variance then interpolates between beta'_j and beta_tilde'_j. Visiting all T
  indices returns `tables` itself, so K = T is bitwise the full ancestral sampler.
  """
  ks = np.sort(np.asarray(grid)).astype(np.int64)
  if ks.size == tables.num_timesteps:
    return tables
  abar = np.cumprod(1.0 - np.asarray(tables.betas, np.float64))[ks]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return schedules.make_tables(betas, dtype=tables.betas.dtype)


def ancestral(tables, model_output, model_var, clip_x0):
  """DDPM Algorithm 2 on an integer grid: x_{t-1} = mu_theta(x_t, t) + sigma_t z.

  On a grid of K < T indices the process is the respaced one of `respaced_tables` (the model is
  still called at the original indices). z = 0 at the last step, whose output is x0_hat.
  """
  def make(grid):
    if not np.array_equal(grid, np.round(grid)):
      raise ValueError("The ancestral sampler needs an integer grid (uniform, quadratic or "
                       "trailing).")
    rt = respaced_tables(tables, grid)
    n = grid.size

    def step(i, x, aux, model_out, key, model_fn):
      j = jnp.full(x.shape[:1], n - 1 - i, jnp.int32)
      out = diffusion.p_mean_variance(rt, model_out, x, j, model_output=model_output,
                                      model_var=model_var, clip_x0=clip_x0)
      noise = jax.random.normal(key, x.shape, x.dtype)
      scale = jnp.where(i < n - 1, jnp.exp(0.5 * out.log_var), 0.0)
      return out.mean + scale * noise, aux, out.pred_x0

    return loop.Stepper(grid, lambda x: (), step)
  return make


def ddim(tables, model_output, model_var, clip_x0, eta: float):
  """DDIM (Song et al. 2021, eq. 12), any (fractional) grid; alpha' etc. at the next point:

    x' = alpha' x0_hat + sqrt(s'^2 - sig^2) eps_hat + sig z,
    sig = eta sqrt(s'^2 / s^2) sqrt(1 - alpha^2 / alpha'^2).

  With eta = 0 this is also Euler on the probability-flow ODE in sigma (Karras et al. 2022,
  sec. 3): x'/alpha' = x/alpha + (sigma' - sigma) eps_hat.
  """
  def make(grid):
    lv = loop.levels(tables, grid)
    with np.errstate(divide="ignore", invalid="ignore"):
      sig = eta * lv.s_next / lv.s * np.sqrt(np.maximum(1.0 - (lv.alpha / lv.alpha_next)**2, 0))
    dir_c = jnp.asarray(np.sqrt(np.maximum(lv.s_next**2 - sig**2, 0.0)), jnp.float32)
    x0_c = jnp.asarray(lv.alpha_next, jnp.float32)
    sig = jnp.asarray(sig, jnp.float32)
    a, s = jnp.asarray(lv.alpha, jnp.float32), jnp.asarray(lv.s, jnp.float32)

    def step(i, x, aux, model_out, key, model_fn):
      x0, eps = loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      x_next = x0_c[i] * x0 + dir_c[i] * eps
      if eta > 0:
        x_next = x_next + sig[i] * jax.random.normal(key, x.shape, x.dtype)
      return x_next, aux, x0

    return loop.Stepper(grid, lambda x: (), step)
  return make
