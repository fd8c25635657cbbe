"""The Gaussian diffusion process as pure functions of arrays (no Flax, no config).

Notation follows Ho et al. 2020: x_0 is data, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
`t` is an int array of array indices 0..T-1 (see `schedules`), one per example; every function
broadcasts the per-timestep constants over the trailing (image) axes of `x`, so they work on a
batch [B, H, W, C] with t [B], or under `jax.vmap` on one example with a scalar t.
"""

from typing import NamedTuple

import jax.numpy as jnp

from ddpm_jax.core import noise_levels
from ddpm_jax.core.noise_levels import MODEL_OUTPUTS
from ddpm_jax.core.schedules import DiffusionTables

MODEL_VARS = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VARS = ("learned", "learned_range")


def gather(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """table[t], reshaped to broadcast against an array of rank `ndim` whose leading axes are t's."""
  t = jnp.asarray(t)
  return table[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def check_choice(name: str, value: str, valid) -> None:
  """The one choice checker: fails naming the valid choices (every factory, `config.validation`)."""
  if value not in valid:
    raise ValueError(f"Unknown {name} {value!r}; valid choices: {list(valid)}.")


# --- q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0) -------------------------------------


def q_mean_variance(tables: DiffusionTables, x0, t):
  """q(x_t|x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4). Returns (mean, var, log_var)."""
  mean = gather(tables.sqrt_abar, t, x0.ndim) * x0
  # Squared from sqrt(1 - abar), itself made in float64: 1 - abar in the compute dtype cancels
  # catastrophically at small t (abar_1 = 0.9999 is 1.0 in bfloat16, giving a variance of 0).
  var = jnp.square(gather(tables.sqrt_one_minus_abar, t, x0.ndim))
  log_var = gather(tables.log_one_minus_abar, t, x0.ndim)
  return mean, jnp.broadcast_to(var, x0.shape), jnp.broadcast_to(log_var, x0.shape)


def q_sample(tables: DiffusionTables, x0, t, noise):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a sample of q(x_t|x_0)."""
  alpha, s = vp_at_index(tables, t, x0.ndim)
  return alpha * x0 + s * noise


def q_posterior_mean_variance(tables: DiffusionTables, x0, x_t, t):
  """q(x_{t-1}|x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I) (DDPM eqs. 6-7).

  Returns (mean, var, clipped log var); the log variance at t = 1 (index 0), where beta_tilde is
  0, is replaced by that of t = 2, as in the DDPM code.
  """
  mean = (gather(tables.posterior_mean_coef1, t, x_t.ndim) * x0
          + gather(tables.posterior_mean_coef2, t, x_t.ndim) * x_t)
  var = gather(tables.posterior_variance, t, x_t.ndim)
  log_var = gather(tables.posterior_log_variance_clipped, t, x_t.ndim)
  return mean, jnp.broadcast_to(var, x_t.shape), jnp.broadcast_to(log_var, x_t.shape)


# --- Conversions between the eps, x0 and v parameterisations ----------------------------------
# The formulas are `noise_levels`'; these apply them at integer t with the tables' coefficients.


def vp_at_index(tables: DiffusionTables, t, ndim: int):
  """(alpha, s) = (sqrt(abar_t), sqrt(1 - abar_t)) from the tables at integer t (DDPM eq. 4).

  Each is shaped to broadcast against an array of rank `ndim` (see `gather`). At integer t these
  are `noise_levels.vp_at` up to rounding; the tables' own values keep DDPM's sampler exact.
  """
  return gather(tables.sqrt_abar, t, ndim), gather(tables.sqrt_one_minus_abar, t, ndim)


def x0_from_eps(tables: DiffusionTables, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (`noise_levels.x0_eps_from_output`)."""
  alpha, s = vp_at_index(tables, t, x_t.ndim)
  return noise_levels.x0_eps_from_output(eps, x_t, alpha, s, "eps")[0]


def eps_from_x0(tables: DiffusionTables, x_t, t, x0):
  """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar), the inverse of `x0_from_eps`."""
  alpha, s = vp_at_index(tables, t, x_t.ndim)
  return noise_levels.x0_eps_from_output(x0, x_t, alpha, s, "x0")[1]


def v_from_x0_eps(tables: DiffusionTables, x0, t, eps):
  """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, sec. 4)."""
  alpha, s = vp_at_index(tables, t, x0.ndim)
  return noise_levels.output_from_x0_eps(x0, eps, alpha, s, "v")


def x0_from_v(tables: DiffusionTables, x_t, t, v):
  """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
  alpha, s = vp_at_index(tables, t, x_t.ndim)
  return noise_levels.x0_eps_from_output(v, x_t, alpha, s, "v")[0]


def eps_from_v(tables: DiffusionTables, x_t, t, v):
  """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
  alpha, s = vp_at_index(tables, t, x_t.ndim)
  return noise_levels.x0_eps_from_output(v, x_t, alpha, s, "v")[1]


def split_model_output(model_out, model_var: str):
  """Splits a network output into (prediction, variance channels or None)."""
  if model_var in LEARNED_VARS:
    return tuple(jnp.split(model_out, 2, axis=-1))
  return model_out, None


def predict_x0_eps(tables: DiffusionTables, pred, x_t, t, model_output: str, clip_x0: bool):
  """Turns the mean part of a network output into (x0_hat, eps_hat) at integer t.

  `noise_levels.x0_eps_from_output` with the tables' (alpha, s) = (sqrt(abar_t),
  sqrt(1 - abar_t)). With `clip_x0`, x0_hat is clipped to [-1, 1] and eps_hat is recomputed from
  the clipped x0_hat, so both describe the same point (what the DDPM and DDIM samplers use).
  """
  check_choice("model_output", model_output, MODEL_OUTPUTS)
  alpha, s = vp_at_index(tables, t, x_t.ndim)
  return noise_levels.x0_eps_from_output(pred, x_t, alpha, s, model_output, clip_x0)


class PMeanVar(NamedTuple):
  """The reverse step p(x_{t-1}|x_t) = N(mean, var), plus the predictions behind it."""
  mean: jnp.ndarray
  var: jnp.ndarray
  log_var: jnp.ndarray
  pred_x0: jnp.ndarray
  pred_eps: jnp.ndarray


def model_log_variance(tables: DiffusionTables, var_out, x_t, t, model_var: str):
  """log sigma_t^2 of p(x_{t-1}|x_t) for each variance type (Ho et al. 2020 sec. 3.2; Nichol &
  Dhariwal 2021 eq. 15 for the learned interpolation)."""
  check_choice("model_var", model_var, MODEL_VARS)
  if model_var == "fixed_small":
    log_var = gather(tables.posterior_log_variance_clipped, t, x_t.ndim)
  elif model_var == "fixed_large":
    log_var = gather(tables.fixed_large_log_variance, t, x_t.ndim)
  elif model_var == "learned":
    log_var = var_out
  else:  # learned_range: Improved DDPM eq. 15, interpolating log beta_tilde and log beta.
    frac = (var_out + 1.0) / 2.0
    min_log = gather(tables.posterior_log_variance_clipped, t, x_t.ndim)
    max_log = gather(jnp.log(tables.betas), t, x_t.ndim)
    log_var = frac * max_log + (1.0 - frac) * min_log
  return jnp.broadcast_to(log_var, x_t.shape)


def p_mean_variance(tables: DiffusionTables, model_out, x_t, t, *, model_output: str = "eps",
                    model_var: str = "fixed_large", clip_x0: bool = True) -> PMeanVar:
  """Mean and variance of p(x_{t-1}|x_t) from a raw network output.

  The mean is the posterior mean q(x_{t-1}|x_t, x0_hat) at the predicted x0_hat (DDPM eq. 11 in
  its x0 form). For learned variances the network output has 2C channels: the prediction, then
  the log variance (`learned`) or the interpolation weight v in [-1, 1] (`learned_range`).
  """
  pred, var_out = split_model_output(model_out, model_var)
  log_var = model_log_variance(tables, var_out, x_t, t, model_var)
  x0, eps = predict_x0_eps(tables, pred, x_t, t, model_output, clip_x0)
  mean, _, _ = q_posterior_mean_variance(tables, x0, x_t, t)
  return PMeanVar(mean=mean, var=jnp.exp(log_var), log_var=log_var, pred_x0=x0, pred_eps=eps)
