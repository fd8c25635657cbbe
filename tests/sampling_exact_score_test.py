"""Samplers on data with an exact score: per pixel, x0 ~ 1/2 N(0.5, 0.1^2) + 1/2 N(-0.5, 0.1^2).

At noise level (alpha, s), x_t per pixel is a mixture of N(+-0.5 alpha, alpha^2 0.01 + s^2), and

  E[x0 | x_t] = sum_k w_k(x_t) (mu_k + alpha 0.01 / (alpha^2 0.01 + s^2) (x_t - alpha mu_k)),

w_k the posterior component weights; eps = (x_t - alpha E[x0 | x_t]) / s is the exact model.
The error is the Wasserstein-1 distance of the pooled pixels to a reference sample of the data,
in units of the floor: the same distance for an independent sample of the data of equal size.
T = 1000, no clipping; the linear schedule unless a test names another (every schedule of
`schedules.SCHEDULES`, with and without zero terminal SNR, in `test_every_sampler_on_every_
schedule`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.core import schedules

MU, STD = 0.5, 0.1
SHAPE = (256, 16)  # 4096 pixels.


@functools.lru_cache(maxsize=None)
def _tables(schedule="linear", zero_terminal_snr=False):
  return schedules.make_tables(schedules.get_beta_schedule(schedule, 1000, zero_terminal_snr))


def _oracle(tables, std=STD):
  """The exact eps of the mixture 1/2 N(+-MU, std^2) per pixel, at fractional t."""
  ls = sampling.grids.log_sigmas(tables)
  idx, lsf = jnp.asarray(np.arange(ls.size), jnp.float32), jnp.asarray(ls, jnp.float32)

  def model_fn(x, t):
    # sigma = inf (zero terminal SNR) gives a = 0, s = 1: x_t is the noise.
    sig = jnp.exp(jnp.interp(t, idx, lsf))[:, None]
    a = 1 / jnp.sqrt(1 + sig**2)
    s = 1 / jnp.sqrt(1 + 1 / sig**2)
    var = a**2 * std**2 + s**2
    w = jax.nn.softmax(jnp.stack([-(x - a * m) ** 2 / (2 * var) for m in (MU, -MU)]), axis=0)
    ex0 = sum(w[k] * (m + a * std**2 / var * (x - a * m)) for k, m in enumerate((MU, -MU)))
    return (x - a * ex0) / s
  return model_fn


def _data(seed, n):
  rng = np.random.default_rng(seed)
  return np.sort(np.where(rng.random(n) < 0.5, MU, -MU) + STD * rng.standard_normal(n))


_REF = _data(0, SHAPE[0] * SHAPE[1])
_FLOOR = float(np.mean(np.abs(_data(1, _REF.size) - _REF)))


# EDM's stochastic sampler is measured with the churn EDM used for ImageNet-64 (Karras et al.
# 2022, Table 5: S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003); S_churn = 0 is Heun.
EDM_CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)


def num_steps(name, nfe):
  """Grid points of `name` for at most `nfe` model calls (Heun-like: 2N - 1 calls)."""
  return (nfe + 1) // 2 if sampling.nfe(name, 2) == 3 else nfe


def _w1(x):
  return float(np.mean(np.abs(np.sort(np.asarray(x).ravel()) - _REF))) / _FLOOR


def _sampler(name, nfe, grid, tables):
  kwargs = EDM_CHURN if name == "edm_stochastic" else {}
  return sampling.get_sampler(name, tables, num_steps=num_steps(name, nfe), clip_x0=False,
                              grid="uniform" if name == "ancestral" else grid, **kwargs)


@functools.lru_cache(maxsize=None)
def error(name, nfe, grid="default", schedule="linear", zero_terminal_snr=False):
  """W1 / floor of `name` at (at most) `nfe` model calls on `grid` (ancestral: uniform)."""
  tables = _tables(schedule, zero_terminal_snr)
  fn = _sampler(name, nfe, grid, tables)
  x, _ = jax.jit(lambda k: fn(_oracle(tables), k, SHAPE))(jax.random.key(0))
  return _w1(x)


@functools.lru_cache(maxsize=None)
def errors_on_every_schedule(name, nfe):
  """{(schedule, zero_terminal_snr): error(name, nfe, "default", ...)} from one compiled program.

  The 16 runs are independent loops in one jit: one compilation instead of 16 (the suite's
  compiles, not these tiny runs, are what take time). Each run is the same computation `error`
  makes, so the values agree with it to float rounding.
  """
  runs = [(_sampler(name, nfe, "default", _tables(*case)), _tables(*case))
          for case in EVERY_SCHEDULE]
  xs = jax.jit(lambda k: [fn(_oracle(tables), k, SHAPE)[0] for fn, tables in runs])(
      jax.random.key(0))
  return {case: _w1(x) for case, x in zip(EVERY_SCHEDULE, xs)}


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_error_falls_with_nfe(name):
  # Heun-like samplers take 3 grid points (4 calls) at a budget of 5: an Euler step from above
  # sigma_max (no trapezoid there) and one to sigma 0.95, as bad as 5 points (8 calls).
  nfes = (10, 25, 50) if name in ("heun", "edm_stochastic") else (5, 10, 25)
  errors = [error(name, n) for n in nfes]
  assert errors[0] > errors[1] > errors[2], errors


# Tolerance: 2.5x the floor for every second-order method by its NFE budget. Chosen after
# measuring (Heun 2.01 at 35 on its quadratic grid, DPM-Solver++ 1.95, SDE 1.04, 3M 1.92 at 25);
# the deterministic solvers level off at 1.9 by 50 NFE, so this allows 30% above that level.
@pytest.mark.parametrize("name, nfe", [("heun", 35), ("dpm_solver_pp", 25),
                                       ("dpm_solver_pp_sde", 25), ("dpm_solver_pp_3m", 25)])
def test_second_order_reaches_the_data(name, nfe):
  assert error(name, nfe) < 2.5


@pytest.mark.parametrize("name", ["dpm_solver_pp", "dpm_solver_pp_3m"])
@pytest.mark.parametrize("nfe", [10, 15, 20, 25, 50])
def test_dpm_solver_pp_no_worse_than_ddim(name, nfe):
  assert error(name, nfe) <= error("ddim", nfe)


def test_heun_on_the_karras_grid_is_second_order_but_loses_at_low_nfe():
  """Why heun's default grid is quadratic: on rho = 7 it loses to DDIM below 35 NFE here."""
  karras = [error("heun", n, "karras") for n in (15, 25, 35)]
  assert karras[0] > error("ddim", 15) and karras[0] > 2 * error("heun", 15)
  assert karras[0] > karras[1] > karras[2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heun", "dpm_solver_pp", "dpm_solver_pp_sde", "dpm_solver_pp_3m"])
@pytest.mark.parametrize("nfe", [15, 25, 35, 50])
def test_second_order_no_worse_than_ddim(name, nfe):
  assert error(name, nfe) <= error("ddim", nfe)


def test_dpm_solver_pp_drops_order_on_a_large_step_ratio():
  # Uniform index spacing ends in one log-SNR step about 4x the one before; a second-order step
  # there was 28x the floor at 20 steps. The step-ratio rule must make it first order.
  assert error("dpm_solver_pp", 20, "uniform") <= error("ddim", 20)


# ---- every sampler on every schedule -------------------------------------------------------

EVERY_SCHEDULE = [(name, z) for name in schedules.SCHEDULES for z in (False, True)]
# W1 / floor that every sampler reaches on every schedule, chosen after measuring the matrix
# (`python benchmarks/exact_score_samplers.py --matrix 50`, `--matrix 20`; docs/samplers.md).
# Before sigma-space grids and Heun's second-order steps were capped at EDM's sigma_max = 80,
# heun was about 60x the floor on the cosine schedule at 49 calls. Stated exceptions: on `const`
# the smallest sigma (0.14) exceeds the data's own 0.1 spread, so the last jump to sigma = 0,
# not the sampler, sets the error (best sampler 4.35 at 50 calls); the samplers on index grids
# (uniform: ancestral, ddim; quadratic: heun, edm_stochastic) leave most of 20 points at noise
# levels above the data on `warmup10` (DDIM 23, Heun 10.6, EDM 19.7 there at 20 calls), and the
# ancestral sampler, exactly DDPM's respaced posterior, is 11.9 there at 50.
INDEX_GRID_SAMPLERS = ("ancestral", "ddim", "heun", "edm_stochastic")


def tolerance(name, nfe, schedule):
  if nfe == 50:
    return 9.0 if schedule == "const" else 12.5 if name == "ancestral" else 6.0
  if name not in INDEX_GRID_SAMPLERS:
    return 5.0
  return {"warmup10": 25.0, "const": 14.0}.get(schedule, 8.0)


@pytest.mark.parametrize("schedule, zero_terminal_snr", EVERY_SCHEDULE,
                         ids=[n + ("+zsnr" if z else "") for n, z in EVERY_SCHEDULE])
@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_every_sampler_on_every_schedule_at_50_calls(name, schedule, zero_terminal_snr):
  err = errors_on_every_schedule(name, 50)[schedule, zero_terminal_snr]
  assert err < tolerance(name, 50, schedule)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, zero_terminal_snr", EVERY_SCHEDULE,
                         ids=[n + ("+zsnr" if z else "") for n, z in EVERY_SCHEDULE])
@pytest.mark.parametrize("name", [n for n in sampling.SAMPLERS if n != "ancestral"])
def test_every_sampler_on_every_schedule_at_20_calls(name, schedule, zero_terminal_snr):
  err = errors_on_every_schedule(name, 20)[schedule, zero_terminal_snr]
  assert err < tolerance(name, 20, schedule)
