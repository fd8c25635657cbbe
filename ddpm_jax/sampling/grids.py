"""Time grids: the decreasing, possibly fractional timestep indices a sampler visits.

A grid is a float64 numpy array g of timestep indices, g[0] = T - 1 > g[1] > ... >= 0; after its
last point every sampler takes one final step to clean data (sigma = 0, signalled t = -1).

Fractional timesteps. A grid point between trained indices is evaluated at fractional t, with
the noise level interpolated linearly in log sigma, sigma = sqrt((1 - abar) / abar) (as
k-diffusion's wrapper for discrete models, `DiscreteSchedule.t_to_sigma`): log sigma(t) is the
linear interpolation of log sigma_k at the neighbouring indices, and abar(t) = 1 / (1 + sigma(t)^2)
is *defined* from it, so the sampler's coefficients and the t fed to the network agree. We chose
interpolation over snapping to the nearest index because the Karras and log-SNR grids are
defined in sigma: snapping would merge points at the dense low-noise end (several grid points
on index 0) and change the step sizes the solvers' error analysis assumes. The U-Net's
sinusoidal embedding is continuous in t, so fractional t is in-distribution between neighbours.
The interpolation is `ddpm_jax.core.noise_levels.sigma_at` (and its inverse `t_at`), the one
that guidance and editing use too; its names are re-exported here.
"""

import numpy as np

# The noise level at fractional t is the core's; kept importable from here (`grids.sigma_at`).
from ddpm_jax.core import denoisers
from ddpm_jax.core.noise_levels import log_sigmas
from ddpm_jax.core.noise_levels import sigma_at  # noqa: F401  (re-exported)
from ddpm_jax.core.noise_levels import t_at
from ddpm_jax.core.schedules import DiffusionTables

# Karras et al. 2022 (EDM), eq. 5: rho = 7.
KARRAS_RHO = 7.0
# The largest noise level of the sigma-space grids and of a second-order step: EDM's sigma_max
# (Karras et al. 2022, sec. 5 and Table 1). A schedule's own largest finite sigma can be far above
# it (cosine: about 20,000; linear: 157), where data of unit scale is lost in the noise; a grid
# that spends points up there starves the levels where the image forms, and a trapezoid step
# from there multiplies a difference of model outputs by (sigma' - sigma) / 2 ~ -10^4.
SIGMA_MAX = denoisers.SIGMA_MAX


def _spacing(num_timesteps: int, num_steps: int, power: float) -> np.ndarray:
  """Integer q_i = floor((T-1) (i/(S-1))^power (+ 0.5 if linear)), made strictly increasing."""
  frac = np.linspace(0.0, 1.0, num_steps, dtype=np.float64)
  last = num_timesteps - 1
  q = np.floor(last * frac + 0.5) if power == 1 else np.floor(last * frac**power)
  i = np.arange(num_steps)
  # tau_i = max(q_i, tau_{i-1} + 1): only changes the dense start of the quadratic curve.
  return (np.maximum.accumulate(q.astype(np.int64) - i) + i).astype(np.float64)


def uniform(tables: DiffusionTables, n: int) -> np.ndarray:
  """Indices round((T-1) i/(n-1)), i = 0..n-1: uniform, ends at T - 1 and 0 (DDIM, 'linear')."""
  return _spacing(tables.num_timesteps, n, 1)[::-1].copy()


def quadratic(tables: DiffusionTables, n: int) -> np.ndarray:
  """floor((T-1) (i/(n-1))^2), made strictly increasing (DDIM paper, sec. D.2)."""
  return _spacing(tables.num_timesteps, n, 2)[::-1].copy()


def trailing(tables: DiffusionTables, n: int) -> np.ndarray:
  """round(T - k T/n) - 1, k = 0..n-1 (Lin et al. 2023, Table 2): starts at T-1, skips index 0."""
  num = tables.num_timesteps
  g = np.round(num - np.arange(n) * num / n) - 1
  return np.maximum(g, 0.0)


def _with_infinite_start(tables, sigmas: np.ndarray) -> np.ndarray:
  """Timesteps of a sigma grid; its first point is T - 1 exactly (sigma = inf if abar_T = 0)."""
  g = t_at(tables, sigmas)
  g[0] = tables.num_timesteps - 1
  return g


def _sigma_range(tables):
  """(smallest sigma, min(largest finite sigma, SIGMA_MAX)) of the schedule."""
  ls = log_sigmas(tables)
  finite = ls[np.isfinite(ls)]
  return np.exp(finite[0]), min(np.exp(finite[-1]), SIGMA_MAX)


def logsnr(tables: DiffusionTables, n: int) -> np.ndarray:
  """Uniform in lambda = -log sigma from min(sigma_max, SIGMA_MAX) to index 0 (DPM-Solver's
  'logSNR'); the first point is index T - 1 itself, whatever its sigma."""
  lo, hi = _sigma_range(tables)
  if n == 1:
    return np.array([tables.num_timesteps - 1.0])
  return _with_infinite_start(tables, np.exp(np.linspace(np.log(hi), np.log(lo), n)))


def karras(tables: DiffusionTables, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
  """sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho (EDM eq. 5).

  smin is the schedule's smallest sigma, smax the smaller of its largest finite sigma and EDM's
  SIGMA_MAX = 80; the first point is index T - 1 itself, whatever its sigma.
  """
  lo, hi = _sigma_range(tables)
  if n == 1:
    return np.array([tables.num_timesteps - 1.0])
  return _with_infinite_start(tables, denoisers.karras_ladder(hi, lo, n, rho))


GRIDS = {"uniform": uniform, "quadratic": quadratic, "trailing": trailing, "logsnr": logsnr,
         "karras": karras}


def make_grid(name: str, tables: DiffusionTables, num_steps: int) -> np.ndarray:
  """The grid `name` with `num_steps` points, checked decreasing and in [0, T - 1]."""
  if num_steps == 1:  # One step: from noise at T - 1 straight to clean data.
    return np.array([tables.num_timesteps - 1.0])
  g = GRIDS[name](tables, num_steps)
  assert g.shape == (num_steps,) and g[0] == tables.num_timesteps - 1, (name, g)
  assert np.all(np.diff(g) < 0) and g[-1] >= 0, (name, g)
  return g

