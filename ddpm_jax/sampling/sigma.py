"""Samplers in sigma = sqrt((1 - abar) / abar) (Karras et al. 2022): Euler, Heun (EDM Alg. 1),
EDM's stochastic sampler (Alg. 2) and Euler-ancestral.

The ODE is dx_VE / dsigma = eps(x, sigma) with x_VE = x / alpha (EDM eq. 3 with s = 1 after the
change of variables). Updates are written as x'_VE = D + sigma' eps (+ corrections), which stays
finite at sigma = inf (abar_T = 0), where x = eps exactly. The state is kept in VP coordinates.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import noise_levels
from ddpm_jax.sampling import grids
from ddpm_jax.sampling import loop

# Heun's trapezoid is used from sigma <= SIGMA_MAX; the tolerance keeps a ladder that starts at
# SIGMA_MAX (EDM's, through float64 rounding: 79.99999711) second order from its first step.
SECOND_ORDER_MAX = grids.SIGMA_MAX * (1 + 1e-6)


def euler(tables, model_output, model_var, clip_x0):
  """Euler: x'_VE = x_VE + (sigma' - sigma) eps = D + sigma' eps (EDM Alg. 1 without line 9)."""
  return heun(tables, model_output, model_var, clip_x0, second_order=False)


def heun(tables, model_output, model_var, clip_x0, second_order: bool = True, churn=None):
  """Heun's method, EDM Algorithm 1: an Euler predictor, then the trapezoid

    x'_VE = x_VE + (sigma' - sigma) (d + d') / 2 = D + sigma' d + (sigma' - sigma) (d' - d) / 2,

  with d = (x_VE - D) / sigma = eps and d' = eps at the predictor. The last step (sigma' = 0) is
  Euler, as in EDM, and so is a step from above EDM's sigma_max (`grids.SIGMA_MAX` = 80, which
  includes sigma = inf): there the trapezoid term (sigma' - sigma) (d' - d) / 2 scales a
  difference of denoiser outputs by up to 10^4 (cosine schedule), while Euler from pure noise
  is nearly exact. A grid of N points costs at most 2N - 1 model calls (`sampling.nfe` counts
  them). The test is on the step's start sigma_hat, so churn that lifts sigma_hat above 80
  (possible only with S_tmax above it) also makes that step Euler.

  `churn` = (S_churn, S_tmin, S_tmax, S_noise) makes it EDM's stochastic sampler (Algorithm 2):
  gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0, and
  step i starts from sigma_hat_i = sigma_i (1 + gamma_i), x_hat = x + sqrt(sigma_hat^2 -
  sigma_i^2) S_noise z (in x_VE). The noise is added at the end of step i - 1, so the loop's
  grid is the sigma_hat grid and every model call is one of Algorithm 2's (NFE still 2N - 1).
  gamma_0 = 0 and sigma_hat <= the schedule's largest finite sigma: a discrete model has no
  noise level above its own T - 1, and x_T is fresh noise already.
  """
  def make(grid):
    lv = loop.levels(tables, grid)
    n = grid.size
    sig_hat, t_hat = lv.sigma, np.asarray(grid, np.float64)
    if churn is not None:
      s_churn, s_tmin, s_tmax, s_noise = churn
      gamma = np.where((lv.sigma >= s_tmin) & (lv.sigma <= s_tmax),
                       min(s_churn / n, np.sqrt(2.0) - 1.0), 0.0)
      gamma[0] = 0.0
      sig_max = noise_levels.sigma_at(tables, np.array(tables.num_timesteps - 1.0))
      sig_hat = np.where(gamma > 0, np.minimum(lv.sigma * (1 + gamma), sig_max), lv.sigma)
      with np.errstate(invalid="ignore", divide="ignore"):
        t_hat = np.where(sig_hat > lv.sigma, noise_levels.t_at(tables, sig_hat), t_hat)
    a_hat, s_hat = noise_levels.vp_from_sigma(sig_hat)
    # After step i: x at sigma_{i+1} becomes x_hat at sigma_hat_{i+1} (VP: times a_hat / a).
    sig_hat_next = np.append(sig_hat[1:], 0.0)
    a_hat_next = np.append(a_hat[1:], 1.0)
    churn_x = a_hat_next / lv.alpha_next
    churn_z = a_hat_next * np.sqrt(np.maximum(sig_hat_next**2 - lv.sigma_next**2, 0.0))
    churn_z = churn_z * (churn[3] if churn is not None else 0.0)
    f = lambda v: jnp.asarray(v, jnp.float32)
    a, s, a1, s1 = f(a_hat), f(s_hat), f(lv.alpha_next), f(lv.s_next)
    half_a1_dsig = f(0.5 * lv.alpha_next * np.where(np.isinf(sig_hat), 0.0,
                                                    lv.sigma_next - sig_hat))
    use2 = f(second_order & (sig_hat <= SECOND_ORDER_MAX) & (lv.sigma_next > 0)) > 0
    t1, cx, cz = f(lv.t_next), f(churn_x), f(churn_z)

    def step(i, x, aux, model_out, key, model_fn):
      x0, eps = loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      # Euler in VP form: alpha' (D + sigma' eps) = alpha' D + s' eps.
      x_euler = a1[i] * x0 + s1[i] * eps

      def correct(_):
        x_pred = x_euler
        out = model_fn(x_pred, jnp.full(x.shape[:1], t1[i], jnp.float32)).astype(x.dtype)
        _, eps1 = loop.predict(out, x_pred, a1[i], s1[i], model_output, model_var, clip_x0)
        return x_euler + half_a1_dsig[i] * (eps1 - eps)

      if not second_order:  # Static: Euler traces the model once.
        return x_euler, aux, x0
      x_next = jax.lax.cond(use2[i], correct, lambda _: x_euler, None)
      if churn is not None:
        x_next = cx[i] * x_next + cz[i] * jax.random.normal(key, x.shape, x.dtype)
      return x_next, aux, x0

    return loop.Stepper(t_hat, lambda x: (), step)
  return make


def euler_ancestral(tables, model_output, model_var, clip_x0):
  """Euler-ancestral (k-diffusion `sample_euler_ancestral`, eta = 1):

    sigma_up^2 = sigma'^2 (1 - sigma'^2 / sigma^2),  sigma_down^2 = sigma'^2 - sigma_up^2,
    x'_VE = D + sigma_down eps + sigma_up z.

  This is DDPM's posterior step written in sigma; at sigma = inf, sigma_up = sigma'.
  """
  def make(grid):
    lv = loop.levels(tables, grid)
    with np.errstate(invalid="ignore", divide="ignore"):
      ratio = np.where(np.isinf(lv.sigma), 0.0, lv.sigma_next / lv.sigma)
    up2 = lv.sigma_next**2 * (1.0 - ratio**2)
    f = lambda v: jnp.asarray(v, jnp.float32)
    a, s, a1 = f(lv.alpha), f(lv.s), f(lv.alpha_next)
    a1_up = f(lv.alpha_next * np.sqrt(up2))
    a1_down = f(lv.alpha_next * np.sqrt(np.maximum(lv.sigma_next**2 - up2, 0.0)))

    def step(i, x, aux, model_out, key, model_fn):
      x0, eps = loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      z = jax.random.normal(key, x.shape, x.dtype)
      return a1[i] * x0 + a1_down[i] * eps + a1_up[i] * z, aux, x0

    return loop.Stepper(grid, lambda x: (), step)
  return make
