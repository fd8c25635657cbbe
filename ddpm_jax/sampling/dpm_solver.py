"""DPM-Solver++ (Lu et al. 2022): 2M, 2M SDE and 3M, multistep, data prediction, in log-SNR time.

lambda = log(alpha / s) = -log sigma; h_i = lambda_{i+1} - lambda_i; D_i the x0 prediction.

  2M (Alg. 2):  x' = (s'/s) x - alpha' expm1(-h) D',
  2M SDE:       x' = (s'/s) e^{-h} x - alpha' expm1(-2h) D' + s' sqrt(-expm1(-2h)) z,
  D' = D_i + h_i / (2 h_{i-1}) (D_i - D_{i-1})   (second order), or D_i (first order).

A step is first order (i) at the start (no D_{i-1}); (ii) into clean data (h = inf, the update
is x = D); (iii) where h_i / h_{i-1} > `MAX_STEP_RATIO`: extrapolating D over a step much longer
than the last is unstable, which is what made 15-20 uniform steps worse than 10 (the step into
index 0 had h = 4.4 h_{i-1}); and (iv) below `LOWER_ORDER_FINAL_STEPS` points, on the step into
the last grid point ("lower_order_final" of the reference code). Everything stays finite at
abar_T = 0: lambda = -inf, s = 1, expm1(-inf) = -1, so x' = s' x + alpha' D.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.sampling import loop

MAX_STEP_RATIO = 2.0
LOWER_ORDER_FINAL_STEPS = 15


def dpm_solver_pp(tables, model_output, model_var, clip_x0, sde: bool = False):
  def make(grid):
    lv = loop.levels(tables, grid)
    with np.errstate(divide="ignore", invalid="ignore"):
      lam = -np.log(lv.sigma)
      lam1 = -np.log(lv.sigma_next)
      h = lam1 - lam
      h_prev = np.append(np.inf, h[:-1])
      ratio = h / h_prev
    n = grid.size
    i = np.arange(n)
    second = (i > 0) & np.isfinite(h) & np.isfinite(h_prev) & (ratio <= MAX_STEP_RATIO)
    if n < LOWER_ORDER_FINAL_STEPS:
      second &= i < n - 2
    corr = np.where(second, 0.5 * ratio, 0.0)
    if sde:
      x_c = lv.s_next / lv.s * np.exp(-h)
      d_c = -lv.alpha_next * np.expm1(-2 * h)
      z_c = lv.s_next * np.sqrt(-np.expm1(-2 * h))
    else:
      x_c = lv.s_next / lv.s
      d_c = -lv.alpha_next * np.expm1(-h)
      z_c = np.zeros(n)
    f = lambda v: jnp.asarray(v, jnp.float32)
    a, s, x_c, d_c, z_c, corr = f(lv.alpha), f(lv.s), f(x_c), f(d_c), f(z_c), f(corr)

    def step(i, x, x0_prev, model_out, key, model_fn):
      x0, _ = loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      d = x0 + corr[i] * (x0 - x0_prev)
      x_next = x_c[i] * x + d_c[i] * d
      if sde:
        x_next = x_next + z_c[i] * jax.random.normal(key, x.shape, x.dtype)
      return x_next, x0, x0

    return loop.Stepper(grid, jnp.zeros_like, step)
  return make


def _weights_3m(lv, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Per step: the order used and the weights (w_D, w_D1, w_D2) of D_i, D_{i-1}, D_{i-2}.

  With phi_2 = expm1(-h)/h + 1, phi_3 = phi_2/h - 1/2, r0 = h_{i-1}/h_i, r1 = h_{i-2}/h_i,
  d1_0 = (D_i - D_{i-1})/r0, d1_1 = (D_{i-1} - D_{i-2})/r1 (Lu et al. 2022, multistep
  third order, in the phi-function form of their eq. for DPM-Solver++ with an expm1 basis):

    order 1: x' = (s'/s) x - alpha' expm1(-h) D_i,
    order 2: + alpha' phi_2 d1_0,
    order 3: + alpha' (phi_2 (d1_0 + (d1_0 - d1_1) r0/(r0 + r1)) - phi_3 (d1_0 - d1_1)/(r0 + r1)).

  The order drops as for 2M: one less per missing past prediction, 1 into clean data, 1 where
  h_i/h_{i-1} > MAX_STEP_RATIO, at most 2 where h_{i-1}/h_{i-2} > MAX_STEP_RATIO, and with fewer
  than LOWER_ORDER_FINAL_STEPS points order 1 into the last grid point and at most 2 before it.
  """
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.log(lv.sigma_next) + np.log(lv.sigma)
    h1 = np.append(np.inf, h[:-1])
    h2 = np.append([np.inf, np.inf], h[:-2])
    i = np.arange(n)
    ok1 = np.isfinite(h) & np.isfinite(h1) & (h / h1 <= MAX_STEP_RATIO) & (i > 0)
    ok2 = ok1 & np.isfinite(h2) & (h1 / h2 <= MAX_STEP_RATIO) & (i > 1)
    if n < LOWER_ORDER_FINAL_STEPS:
      ok1 &= i < n - 2
      ok2 &= i < n - 3
    order = np.where(ok2, 3, np.where(ok1, 2, 1))
    w = np.zeros((n, 3))
    w[:, 0] = -np.expm1(-h)
    hs = np.where(order > 1, h, 1.0)  # Finite placeholders where the terms are unused.
    r0 = np.where(order > 1, h1 / hs, 1.0)
    r1 = np.where(order > 2, h2 / hs, 1.0)
    phi2 = np.expm1(-hs) / hs + 1.0
    phi3 = phi2 / hs - 0.5
    e = np.eye(3)
    d1_0 = (e[0] - e[1])[None] / r0[:, None]
    d1_1 = (e[1] - e[2])[None] / r1[:, None]
    third = (phi2[:, None] * (d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))[:, None])
             - phi3[:, None] * (d1_0 - d1_1) / (r0 + r1)[:, None])
    w += np.where((order == 2)[:, None], phi2[:, None] * d1_0, 0.0)
    w += np.where((order == 3)[:, None], third, 0.0)
  return order, w * lv.alpha_next[:, None]


def dpm_solver_pp_3m(tables, model_output, model_var, clip_x0):
  """DPM-Solver++(3M): x' = (s'/s) x + w_0 D_i + w_1 D_{i-1} + w_2 D_{i-2} (`_weights_3m`)."""
  def make(grid):
    lv = loop.levels(tables, grid)
    _, w = _weights_3m(lv, grid.size)
    f = lambda v: jnp.asarray(v, jnp.float32)
    a, s, x_c, w = f(lv.alpha), f(lv.s), f(lv.s_next / lv.s), f(w)

    def step(i, x, past, model_out, key, model_fn):
      x0, _ = loop.predict(model_out, x, a[i], s[i], model_output, model_var, clip_x0)
      x1, x2 = past
      x_next = x_c[i] * x + w[i, 0] * x0 + w[i, 1] * x1 + w[i, 2] * x2
      return x_next, (x0, x1), x0

    return loop.Stepper(grid, lambda x: (jnp.zeros_like(x), jnp.zeros_like(x)), step)
  return make
