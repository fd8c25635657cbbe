"""Noise levels at fractional t and the eps / x0 / v conversions: one formula for each quantity.

VP coordinates (Ho et al. 2020, eq. 4): x_t = alpha x_0 + s eps, alpha = sqrt(abar), s =
sqrt(1 - abar). The noise level is sigma = s / alpha = sqrt((1 - abar) / abar), the noise of the
VE coordinate x_t / alpha = x_0 + sigma eps (Karras et al. 2022, eq. 4 with s(t) = alpha), and
conversely alpha = 1 / sqrt(1 + sigma^2), s = sigma / sqrt(1 + sigma^2).

Fractional t (see `ddpm_jax.sampling.grids` for why): log sigma is interpolated linearly between
the neighbouring indices (k-diffusion's `DiscreteSchedule.t_to_sigma`), and alpha, s are defined
from that sigma. t < 0 means clean data: sigma = 0, alpha = 1, s = 0.

Array types. `sigma_at` and `vp_from_sigma` take NumPy or jax arrays: NumPy in gives float64 NumPy
out (the samplers' coefficients, made once per grid); a jax array in, traced or not, gives float32
jnp out (guidance and editing at the t the model is called with), the same formula applied to
float32 copies of the same float64 log-sigma table. The conversions take (alpha, s) however they
were made: from the tables at integer t (`diffusion`), or from `vp_at` at fractional t.

Nothing here imports the rest of ddpm_jax but the tables' type.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core.schedules import DiffusionTables

MODEL_OUTPUTS = ("eps", "x0", "v")

# 1 / alpha is taken of max(alpha, MIN_ALPHA), so abar = 0 (jsd, zero terminal SNR) gives a huge
# but finite x0 from eps, which clipping then tames, rather than inf/NaN (an abar floor of 1e-12).
MIN_ALPHA = 1e-6


def _xp(*arrays):
  """jnp if any argument is a jax array (a tracer is one too), else np."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def per_example(v, x):
  """A per-example [B] array shaped to broadcast against x [B, ...]."""
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v)))


# --- Noise levels ---------------------------------------------------------------------------------


def log_sigmas(tables: DiffusionTables) -> np.ndarray:
  """log sigma_k = 0.5 (log(1 - abar_k) - log abar_k), k = 0..T-1, float64 (+inf where abar = 0).

  1 - abar is taken as the square of the table sqrt(1 - abar) (made in float64), not computed
  from abar: 1 - abar in float32 cancels at small t.
  """
  abar = np.asarray(tables.abar, np.float64)
  one_minus = np.square(np.asarray(tables.sqrt_one_minus_abar, np.float64))
  with np.errstate(divide="ignore"):
    return 0.5 * (np.log(one_minus) - np.log(abar))


def sigma_at(tables: DiffusionTables, t):
  """sigma(t) at fractional t in [0, T-1]: exp of log sigma interpolated linearly; t < 0 gives 0.

  log sigma(t) = (1 - f) log sigma_k + f log sigma_{k+1}, k = floor(t), f = t - k. Only finite
  entries are interpolated: an infinite last entry (abar_{T-1} = 0) makes sigma = inf at
  t = T - 1 only (between T - 2 and T - 1, sigma = sigma_{T-2}).

  Args:
    tables: the schedule's tables.
    t: NumPy (-> float64 NumPy) or jax array (-> float32 jnp, usable under jit) of any shape.
  """
  ls = log_sigmas(tables)
  last = ls.size - 1
  finite = np.isfinite(ls)
  xp = _xp(t)
  dtype = jnp.float32 if xp is jnp else np.float64
  t = xp.asarray(t, dtype)
  idx = xp.asarray(np.arange(ls.size)[finite], dtype)
  out = xp.exp(xp.interp(t, idx, xp.asarray(ls[finite], dtype)))
  out = xp.where(t >= last, xp.asarray(np.exp(ls[last]), dtype), out)
  return xp.where(t < 0, 0.0, out)


def t_at(tables: DiffusionTables, sigma: np.ndarray) -> np.ndarray:
  """The inverse of `sigma_at` over the finite sigmas: fractional t with sigma(t) = sigma, NumPy."""
  ls = log_sigmas(tables)
  finite = np.isfinite(ls)
  idx = np.arange(ls.size, dtype=np.float64)
  with np.errstate(divide="ignore"):
    return np.interp(np.log(np.asarray(sigma, np.float64)), ls[finite], idx[finite])


def vp_from_sigma(sigma):
  """(alpha, s) = (1 / sqrt(1 + sigma^2), sigma / sqrt(1 + sigma^2)); sigma = inf gives (0, 1).

  NumPy in, NumPy out (in sigma's dtype); jax in, jnp out.
  """
  xp = _xp(sigma)
  with np.errstate(invalid="ignore", divide="ignore"):  # inf / inf, replaced below.
    alpha = xp.where(xp.isinf(sigma), 0.0, 1.0 / xp.sqrt(1.0 + sigma**2))
    s = xp.where(xp.isinf(sigma), 1.0, sigma / xp.sqrt(1.0 + sigma**2))
  return alpha, s


def vp_at(tables: DiffusionTables, t):
  """(alpha, s) at fractional t: `vp_from_sigma(sigma_at(tables, t))`. t < 0 gives (1, 0)."""
  return vp_from_sigma(sigma_at(tables, t))


# --- Conversions between the eps, x0 and v parameterisations --------------------------------------
#
# Every conversion multiplies by 1 / alpha and 1 / s and never divides by them: XLA may rewrite a
# division by a scalar differently per compilation, which would break the samplers' bitwise
# equality across device counts.


def x0_eps_from_output(pred, x, alpha, s, model_output: str, clip_x0: bool = False):
  """(x0_hat, eps_hat) from a prediction of `model_output` at x_t = x = alpha x0 + s eps.

    eps: x0 = (x - s eps) / alpha;  x0: eps = (x - alpha x0) / s;
    v (Salimans & Ho 2022, sec. 4, v = alpha eps - s x0): x0 = alpha x - s v, eps = s x + alpha v.

  1 / alpha is taken of max(alpha, MIN_ALPHA). With `clip_x0`, x0_hat is clipped to [-1, 1] and
  eps_hat is recomputed from it, so both describe the same x (what the samplers use).

  Args:
    pred: the prediction (the mean channels of the network output).
    x: x_t, broadcastable with pred.
    alpha, s: the VP coefficients, scalars or broadcastable against x.
    model_output: one of `MODEL_OUTPUTS`.
    clip_x0: clip x0_hat to [-1, 1].
  """
  if model_output == "eps":
    eps = pred
    x0 = (x - s * eps) * (1.0 / jnp.maximum(alpha, MIN_ALPHA))
  elif model_output == "x0":
    x0 = pred
    eps = (x - alpha * x0) * (1.0 / s)
  elif model_output == "v":
    x0 = alpha * x - s * pred
    eps = s * x + alpha * pred
  else:
    raise ValueError(f"Unknown model_output {model_output!r}; valid choices: "
                     f"{list(MODEL_OUTPUTS)}.")
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - alpha * x0) * (1.0 / s)
  return x0, eps


def output_from_x0_eps(x0, eps, alpha, s, model_output: str):
  """What a `model_output` network should predict for (x0, eps): eps, x0, or v = alpha eps - s x0.

  The training target (v: Salimans & Ho 2022, sec. 4); the inverse of `x0_eps_from_output`.
  """
  if model_output == "eps":
    return eps
  if model_output == "x0":
    return x0
  if model_output == "v":
    return alpha * eps - s * x0
  raise ValueError(f"Unknown model_output {model_output!r}; valid choices: {list(MODEL_OUTPUTS)}.")


def add_eps_shift(pred, d, alpha, s, model_output: str):
  """The prediction whose eps_hat is eps_hat + d at the same x_t (guidance's shifts).

  At fixed x_t, x0 and v are affine in eps (x0 = (x - s eps) / alpha, v = (eps - s x) / alpha), so

    eps: eps + d;  x0: x0 - (s / alpha) d;  v: v + d / alpha,

  with 1 / alpha of max(alpha, MIN_ALPHA). Written as the shift itself, not a round trip through
  `x0_eps_from_output`, which would cancel catastrophically where alpha is small.
  """
  if model_output == "eps":
    return pred + d
  inv_alpha = 1.0 / jnp.maximum(alpha, MIN_ALPHA)
  if model_output == "x0":
    return pred - (s * inv_alpha) * d
  if model_output == "v":
    return pred + inv_alpha * d
  raise ValueError(f"Unknown model_output {model_output!r}; valid choices: {list(MODEL_OUTPUTS)}.")
