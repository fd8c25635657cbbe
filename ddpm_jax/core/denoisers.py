"""Continuous-sigma parameterisations as denoisers D(x, sigma), and the bridge to every sampler.

A denoiser maps a VE-coordinate input x = x_0 + sigma eps and its noise level sigma to an
estimate of x_0 (Karras et al. 2022, "Elucidating the design space...", sec. 2). Two
parameterisations of the network are here, as pure functions of arrays:

* **EDM** (Karras et al. 2022, sec. 5 and Table 1): D(x, sigma) = c_skip x + c_out F(c_in x,
  c_noise) with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4, sd = sigma_data. Training draws
  log sigma ~ N(P_mean, P_std^2) and weights ||D - x_0||^2 by lambda = (sigma^2 + sd^2) /
  (sigma sd)^2 = 1 / c_out^2, so that the network's own target has unit variance at every sigma.
* **Flow matching / rectified flow** (Lipman et al. 2023; Liu et al. 2023): x_t = (1 - t) x_0 +
  t eps, t in [0, 1], and the network predicts the velocity v = eps - x_0. Since x_t / (1 - t) =
  x_0 + (t / (1 - t)) eps, it is the VE process at sigma = t / (1 - t), and D = x_t - t v. The
  logit-normal t of Esser et al. 2024 (sec. 3.1) is `logit_normal_t`.

`tables_from_sigmas` turns any increasing noise ladder into `DiffusionTables` (abar = 1 / (1 +
sigma^2)), and `vp_x0_model` wraps a denoiser as a discrete model of x_0 on those tables, so
every sampler of `ddpm_jax.sampling` (which interpolates log sigma at fractional t) samples an
EDM or flow-matching network with `model_output="x0"`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import noise_levels
from ddpm_jax.core import schedules

# EDM's defaults (Karras et al. 2022, Table 1 and sec. 5): CIFAR-10's sigma_data, the training
# log-normal, and the sampling range.
SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # D(x_VE [B, ...], sigma [B]) -> x_0

# What the network is: DDPM's discrete VP model (eps / x0 / v at integer t, `losses.get_loss_fn`),
# EDM's preconditioned denoiser, or a flow-matching velocity field.
PARAMETERIZATIONS = ("ddpm", "edm", "flow")
# The U-Net embeds its time input with DDPM's sinusoids, made for t in 0..999. EDM's c_noise =
# log(sigma) / 4 spans [-1.55, 1.10] on [0.002, 80] and flow time t spans [0, 1], so this
# codebase scales both to a range of several hundred first: the network's time input is
# 250 c_noise for EDM (662 wide on EDM's ladder; EDM's own U-Nets take c_noise unscaled into
# embeddings made for it) and 1000 t for flow matching (as rectified-flow models do: Esser et al.
# 2024).
EDM_TIME_SCALE = 250.0
FLOW_TIME_SCALE = 1000.0


_bcast = noise_levels.per_example


# --- EDM --------------------------------------------------------------------------------------


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA):
  """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning at noise level sigma (Table 1)."""
  total = sigma**2 + sigma_data**2
  return (sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1 / jnp.sqrt(total),
          jnp.log(sigma) / 4)


def edm_loss_weight(sigma, sigma_data: float = SIGMA_DATA):
  """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, EDM's weight of ||D - x_0||^2."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_sample_sigma(key: jax.Array, shape, p_mean: float = P_MEAN, p_std: float = P_STD):
  """Training noise levels: log sigma ~ N(p_mean, p_std^2)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def edm_denoiser(net_fn: Callable, sigma_data: float = SIGMA_DATA) -> Denoiser:
  """D(x, sigma) = c_skip x + c_out net_fn(c_in x, c_noise), net_fn(x [B, ...], c_noise [B])."""
  def denoise(x, sigma):
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    out = net_fn(_bcast(c_in, x) * x, c_noise)
    return _bcast(c_skip, x) * x + _bcast(c_out, x) * out
  return denoise


def edm_loss(net_fn: Callable, x0, sigma, noise, sigma_data: float = SIGMA_DATA):
  """Per-example lambda(sigma) ||D(x_0 + sigma n, sigma) - x_0||^2 averaged over pixels."""
  d = edm_denoiser(net_fn, sigma_data)(x0 + _bcast(sigma, x0) * noise, sigma)
  per_pixel = jnp.square(d - x0).reshape(x0.shape[0], -1)
  return edm_loss_weight(sigma, sigma_data) * jnp.mean(per_pixel, axis=-1)


# --- Flow matching ----------------------------------------------------------------------------


def flow_interpolate(x0, noise, t):
  """x_t = (1 - t) x_0 + t eps (t [B] in [0, 1])."""
  t = _bcast(t, x0)
  return (1 - t) * x0 + t * noise


def flow_target(x0, noise):
  """The velocity dx_t/dt = eps - x_0 that the network regresses."""
  return noise - x0


def logit_normal_t(key: jax.Array, shape, mean: float = 0.0, std: float = 1.0):
  """t = sigmoid(u), u ~ N(mean, std^2) (Esser et al. 2024, eq. 19)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))


def flow_t_from_sigma(sigma):
  """t = sigma / (1 + sigma), the flow time of VE noise level sigma (1 at sigma = inf)."""
  return jnp.where(jnp.isinf(sigma), 1.0, sigma / (1 + sigma))


def sigma_from_flow_t(t):
  """sigma = t / (1 - t)."""
  return t / (1 - t)


def flow_denoiser(velocity_fn: Callable) -> Denoiser:
  """D(x, sigma) = x_t - t v(x_t, t) with t = sigma / (1 + sigma), x_t = (1 - t) x."""
  def denoise(x, sigma):
    t = flow_t_from_sigma(sigma)
    x_t = _bcast(1 - t, x) * x
    return x_t - _bcast(t, x) * velocity_fn(x_t, t)
  return denoise


def flow_matching_loss(velocity_fn: Callable, x0, t, noise):
  """Per-example ||v(x_t, t) - (eps - x_0)||^2 averaged over pixels."""
  err = velocity_fn(flow_interpolate(x0, noise, t), t) - flow_target(x0, noise)
  return jnp.mean(jnp.square(err).reshape(x0.shape[0], -1), axis=-1)


# --- A network as a denoiser, and its training loss ---------------------------------------------


def network_denoiser(net_fn: Callable, parameterization: str,
                     sigma_data: float = SIGMA_DATA) -> Denoiser:
  """D(x, sigma) of a network `net_fn(x, time_input [B])` trained as `parameterization`
  ('edm' or 'flow'), with the time input scaled as `EDM_TIME_SCALE` / `FLOW_TIME_SCALE` say."""
  if parameterization == "edm":
    return edm_denoiser(lambda x, c_noise: net_fn(x, EDM_TIME_SCALE * c_noise), sigma_data)
  if parameterization == "flow":
    return flow_denoiser(lambda x, t: net_fn(x, FLOW_TIME_SCALE * t))
  raise ValueError(f"network_denoiser takes 'edm' or 'flow', got {parameterization!r} (a 'ddpm' "
                   "model is sampled on its own schedule's tables)")


# --- The bridge to the discrete samplers -------------------------------------------------------


def tables_from_sigmas(sigmas: np.ndarray) -> schedules.DiffusionTables:
  """`DiffusionTables` whose index k has noise level sigmas[k] (strictly increasing, > 0).

  abar_k = 1 / (1 + sigma_k^2) and beta_k = 1 - abar_k / abar_{k-1}, so `noise_levels.sigma_at`
  returns sigmas[k] at integer k (to float64 rounding) and interpolates log sigma between.
  """
  sigmas = np.asarray(sigmas, np.float64)
  if (sigmas.ndim != 1 or sigmas.size < 2 or not np.all(np.isfinite(sigmas)) or sigmas[0] <= 0
      or np.any(np.diff(sigmas) <= 0)):
    raise ValueError("sigmas must be a strictly increasing 1-D array of finite positive noise "
                     "levels (EDM's c_noise = log(sigma) / 4 has no value at sigma = inf)")
  abar = 1.0 / (1.0 + sigmas**2)
  return schedules.make_tables(1.0 - abar / np.append(1.0, abar[:-1]))


def karras_ladder(sigma_max: float, sigma_min: float, num: int, rho: float = 7.0) -> np.ndarray:
  """sigma_i = (smax^(1/rho) + i/(num-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..num-1: EDM's
  eq. 5, decreasing from sigma_max to sigma_min (float64)."""
  ramp = np.linspace(0.0, 1.0, num)
  return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def edm_sigmas(num: int = 1000, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = 7.0) -> np.ndarray:
  """An increasing ladder of `num` noise levels: EDM's (eq. 5) from sigma_min to sigma_max."""
  return karras_ladder(sigma_max, sigma_min, num, rho)[::-1].copy()


def vp_x0_model(denoiser: Denoiser, tables: schedules.DiffusionTables) -> Callable:
  """`model_fn(x_t, t) -> x_0` for the samplers (`model_output="x0"`): the VP state x_t at
  (fractional) index t is x_VE alpha, so D is called at x_t sqrt(1 + sigma^2) and sigma(t)."""
  def model_fn(x_t, t):
    sigma = noise_levels.sigma_at(tables, t)
    scale = jnp.sqrt(1 + jnp.square(sigma))
    return denoiser(x_t * _bcast(scale, x_t), sigma)
  return model_fn
