"""Samplers in sigma = sqrt((1 - abar) / abar) (Karras et al. 2022): Euler, Heun, Euler-ancestral.

The ODE is dx_VE / dsigma = eps(x, sigma) with x_VE = x / alpha (EDM eq. 3 with s = 1 after the
change of variables). Updates are written as x'_VE = D + sigma' eps (+ corrections), which stays
finite at sigma = inf (abar_T = 0), where x = eps exactly. The state is kept in VP coordinates.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.sampling import _loop


def euler(tables, model_output, model_var, clip_x0):
  """Euler: x'_VE = x_VE + (sigma' - sigma) eps = D + sigma' eps (EDM Alg. 1 without line 9)."""
  return heun(tables, model_output, model_var, clip_x0, second_order=False)


def heun(tables, model_output, model_var, clip_x0, second_order: bool = True):
  """Heun's method, EDM Algorithm 1: an Euler predictor, then the trapezoid

    x'_VE = x_VE + (sigma' - sigma) (d + d') / 2 = D + sigma' d + (sigma' - sigma) (d' - d) / 2,

  with d' = eps at the predictor. The last step (sigma' = 0) is Euler, as in EDM, and so is a
  step from sigma = inf: a grid of N points costs 2N - 1 model calls (2N - 2 if abar_T = 0).
  """
  def make(grid):
    lv = _loop.levels(tables, grid)
    f = lambda v: jnp.asarray(v, jnp.float32)
    a, s, a1, s1 = f(lv.alpha), f(lv.s), f(lv.alpha_next), f(lv.s_next)
    half_a1_dsig = f(0.5 * lv.alpha_next * np.where(np.isinf(lv.sigma), 0.0,
                                                    lv.sigma_next - lv.sigma))
    use2 = f(second_order & np.isfinite(lv.sigma) & (lv.sigma_next > 0)) > 0
    t1 = f(lv.t_next)

    def step(i, x, aux, model_out, key, model_fn):
      x0, eps = _loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      # Euler in VP form: alpha' (D + sigma' eps) = alpha' D + s' eps.
      x_euler = a1[i] * x0 + s1[i] * eps

      def correct(_):
        x_pred = x_euler
        out = model_fn(x_pred, jnp.full(x.shape[:1], t1[i], jnp.float32)).astype(x.dtype)
        _, eps1 = _loop.predict(out, x_pred, a1[i], s1[i], model_output, model_var, clip_x0)
        return x_euler + half_a1_dsig[i] * (eps1 - eps)

      if not second_order:  # Static: Euler traces the model once.
        return x_euler, aux, x0
      return jax.lax.cond(use2[i], correct, lambda _: x_euler, None), aux, x0

    return _loop.Stepper(grid, lambda x: (), step)
  return make


def euler_ancestral(tables, model_output, model_var, clip_x0):
  """Euler-ancestral (k-diffusion `sample_euler_ancestral`, eta = 1):

    sigma_up^2 = sigma'^2 (1 - sigma'^2 / sigma^2),  sigma_down^2 = sigma'^2 - sigma_up^2,
    x'_VE = D + sigma_down eps + sigma_up z.

  This is DDPM's posterior step written in sigma; at sigma = inf, sigma_up = sigma'.
  """
  def make(grid):
    lv = _loop.levels(tables, grid)
    with np.errstate(invalid="ignore", divide="ignore"):
      ratio = np.where(np.isinf(lv.sigma), 0.0, lv.sigma_next / lv.sigma)
    up2 = lv.sigma_next**2 * (1.0 - ratio**2)
    f = lambda v: jnp.asarray(v, jnp.float32)
    a, s, a1 = f(lv.alpha), f(lv.s), f(lv.alpha_next)
    a1_up = f(lv.alpha_next * np.sqrt(up2))
    a1_down = f(lv.alpha_next * np.sqrt(np.maximum(lv.sigma_next**2 - up2, 0.0)))

    def step(i, x, aux, model_out, key, model_fn):
      x0, eps = _loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      z = jax.random.normal(key, x.shape, x.dtype)
      return a1[i] * x0 + a1_down[i] * eps + a1_up[i] * z, aux, x0

    return _loop.Stepper(grid, lambda x: (), step)
  return make
