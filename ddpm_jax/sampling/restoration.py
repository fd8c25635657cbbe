"""Zero-shot solvers of linear inverse problems y = A x0 + sigma_y n with an unconditional model.

Both solvers are a change of the model, not of the sampler: they turn `model_fn(x_t, t)` into a
model of x0 whose prediction x0' is the network's x0_hat corrected by the measurement, and any
sampler of `ddpm_jax.sampling` then walks from x0' (build it with model_output='x0' and
clip_x0=False: `x0_model` clips x0_hat itself, before the correction, when asked). So they
compose with every sampler (ancestral, DDIM, Euler, Heun, DPM-Solver++, ...), with
class-conditional models and classifier-free guidance (which happen inside `model_fn`).

DDNM (Wang et al. 2023, "Zero-shot image restoration using denoising diffusion null-space
model", eq. 13): x0' = A^+ y + (I - A^+ A) x0_hat, i.e. x0_hat + A^+ (y - A x0_hat): the range
of A^T comes from the measurement, the null space from the model, so A x0' = y exactly. With the
ancestral sampler this is their Algorithm 1 (x_{t-1} ~ q(x_{t-1} | x_t, x0')). For sigma_y > 0
the correction is shrunk as the posterior of x0 given x_t and y would shrink it if p(x0 | x_t)
were N(x0_hat, r_t^2 I):

  x0' = x0_hat + A^T (A A^T + (sigma_y^2 / r_t^2) I)^+ (y - A x0_hat),

our choice in place of DDNM+'s per-step noise budget (eq. 17-19 there), which needs the
sampler's next level; it equals DDNM at sigma_y = 0 and fades the measurement out as r_t -> 0.

PiGDM (Song et al. 2023, "Pseudoinverse-guided diffusion models for inverse problems", eq. 7-8):
the score gains grad_{x_t} log p(y | x_t) with p(y | x_t) = N(A x0_hat, r_t^2 A A^T +
sigma_y^2 I), whose gradient is J^T A^T (r_t^2 A A^T + sigma_y^2 I)^-1 (y - A x0_hat) with
J = d x0_hat / d x_t (one vector-Jacobian product through the network). By Tweedie's formula a
score change g moves x0_hat by (s_t^2 / alpha_t) g, which is the x0' returned here.

r_t^2 = sigma_data^2 s_t^2 / (alpha_t^2 sigma_data^2 + s_t^2) is the variance of x0 given x_t for
data of per-pixel variance sigma_data^2 (PiGDM's r_t^2 = sigma_t^2 / (1 + sigma_t^2) is
sigma_data = 1). For Gaussian data N(mu, sigma_data^2 I) both are exact: the samplers then draw
the exact posterior p(x0 | y) (tests/restoration_test.py).
"""

import jax
import jax.numpy as jnp

from ddpm_jax.core import degradations
from ddpm_jax.core import diffusion
from ddpm_jax.core import noise_levels

METHODS = ("ddnm", "pigdm")


def check(method: str, sigma_y: float) -> None:
  """Raises ValueError for an unknown method or a negative measurement noise."""
  diffusion.check_choice("restoration method", method, METHODS)
  if not sigma_y >= 0:
    raise ValueError(f"The measurement noise sigma_y must be >= 0, got {sigma_y}.")


def posterior_var(alpha, s, sigma_data: float):
  """r_t^2: the variance of x0 | x_t for data of per-pixel variance sigma_data^2."""
  sd2 = sigma_data * sigma_data
  return sd2 * s * s / (alpha * alpha * sd2 + s * s)


def measure(op: degradations.Operator, x0, sigma_y: float, key: jax.Array):
  """y = A x0 + sigma_y n, n ~ N(0, I) drawn at y's global shape from `key`."""
  y = op.A(x0)
  return y + sigma_y * jax.random.normal(key, y.shape, y.dtype) if sigma_y > 0 else y


def x0_model(model_fn, tables, op: degradations.Operator, y, *, method: str, sigma_y: float,
             model_output: str = "eps", model_var: str = "fixed_large", clip_x0: bool = True,
             sigma_data: float = 1.0):
  """`model_fn(x_t, t) -> x0'` (variance channels kept) of `method` for the measurement y.

  Args:
    model_fn: the (guided) network as the samplers call it, predicting `model_output`.
    tables: the schedule the samplers walk (fractional t gives (alpha, s) by `vp_at`).
    op: the degradation operator; y = A x0 + sigma_y n its measurement, y-shaped for the batch.
    method: one of `METHODS`.
    sigma_y: the measurement noise (>= 0).
    model_output, model_var: what `model_fn` returns (see `diffusion`).
    clip_x0: clip x0_hat to [-1, 1] before the correction.
    sigma_data: the data's per-pixel standard deviation in r_t^2.
  """
  check(method, float(sigma_y))
  y = jnp.asarray(y, jnp.float32)
  sy2 = float(sigma_y) ** 2

  def predict(x, t, alpha, s):
    pred, var = diffusion.split_model_output(model_fn(x, t).astype(x.dtype), model_var)
    x0, _ = noise_levels.x0_eps_from_output(pred, x, alpha, s, model_output, clip_x0)
    return x0, var

  def fn(x, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    alpha, s = noise_levels.vp_at(tables, t)
    r2 = posterior_var(alpha, s, sigma_data)
    # sigma_y^2 / r_t^2, 0 when noiseless (also where r_t = 0: nothing to shrink then).
    reg = jnp.where(r2 > 0, sy2 / jnp.where(r2 > 0, r2, 1.0), jnp.inf) if sy2 else 0.0
    a4, s4 = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (alpha, s))
    if method == "ddnm":
      x0, var = predict(x, t, a4, s4)
      x0 = x0 + op.pinv_reg(y - op.A(x0), reg)
    else:
      (x0, vjp, var) = jax.vjp(lambda x_: predict(x_, t, a4, s4), x, has_aux=True)
      # J^T A^T (r^2 A A^T + sigma_y^2)^-1 (y - A x0_hat) = J^T pinv_reg(., reg) / r^2, and the
      # Tweedie factor s^2 / alpha: (s^2 / (alpha r^2)) = (alpha^2 sd^2 + s^2) / (alpha sd^2).
      (g,) = vjp(op.pinv_reg(y - op.A(x0), reg))
      sd2 = sigma_data * sigma_data
      scale = (a4 * a4 * sd2 + s4 * s4) / (jnp.maximum(a4, noise_levels.MIN_ALPHA) * sd2)
      x0 = x0 + scale * g
    return x0 if var is None else jnp.concatenate([x0, var.astype(x0.dtype)], axis=-1)

  return fn


def restore(sample_fn, model_fn, tables, rng, op, y, shape, **kwargs):
  """Samples x0 | y with `sample_fn` (model_output='x0', clip_x0=False); kwargs: `x0_model`'s.

  Returns (images, trajectory).
  """
  return sample_fn(x0_model(model_fn, tables, op, y, **kwargs), rng, shape)
