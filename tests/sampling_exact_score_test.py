"""Samplers on data with an exact score: per pixel, x0 ~ 1/2 N(0.5, 0.1^2) + 1/2 N(-0.5, 0.1^2).

At noise level (alpha, s), x_t per pixel is a mixture of N(+-0.5 alpha, alpha^2 0.01 + s^2), and

  E[x0 | x_t] = sum_k w_k(x_t) (mu_k + alpha 0.01 / (alpha^2 0.01 + s^2) (x_t - alpha mu_k)),

w_k the posterior component weights; eps = (x_t - alpha E[x0 | x_t]) / s is the exact model.
The error is the Wasserstein-1 distance of the pooled pixels to a reference sample of the data,
in units of the floor: the same distance for an independent sample of the data of equal size.
Linear schedule, T = 1000, no clipping.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling, schedules

MU, STD = 0.5, 0.1
SHAPE = (256, 16)  # 4096 pixels.


@functools.lru_cache(maxsize=None)
def _tables():
  return schedules.make_tables(schedules.get_beta_schedule("linear", 1000))


def _oracle(tables):
  ls = sampling.grids.log_sigmas(tables)
  idx, lsf = jnp.asarray(np.arange(ls.size), jnp.float32), jnp.asarray(ls, jnp.float32)

  def model_fn(x, t):
    sig = jnp.exp(jnp.interp(t, idx, lsf))[:, None]
    a = 1 / jnp.sqrt(1 + sig**2)
    s = sig * a
    var = a**2 * STD**2 + s**2
    w = jax.nn.softmax(jnp.stack([-(x - a * m) ** 2 / (2 * var) for m in (MU, -MU)]), axis=0)
    ex0 = sum(w[k] * (m + a * STD**2 / var * (x - a * m)) for k, m in enumerate((MU, -MU)))
    return (x - a * ex0) / s
  return model_fn


def _data(seed, n):
  rng = np.random.default_rng(seed)
  return np.sort(np.where(rng.random(n) < 0.5, MU, -MU) + STD * rng.standard_normal(n))


_REF = _data(0, SHAPE[0] * SHAPE[1])
_FLOOR = float(np.mean(np.abs(_data(1, _REF.size) - _REF)))


@functools.lru_cache(maxsize=None)
def _error(name, nfe):
  """W1 / floor of `name` at (at most) `nfe` model calls on its default grid."""
  steps = (nfe + 1) // 2 if name == "heun" else nfe
  fn = sampling.get_sampler(name, _tables(), num_steps=steps, clip_x0=False,
                            grid="uniform" if name == "ancestral" else "default")
  x, _ = jax.jit(lambda k: fn(_oracle(_tables()), k, SHAPE))(jax.random.key(0))
  return float(np.mean(np.abs(np.sort(np.asarray(x).ravel()) - _REF))) / _FLOOR


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_error_falls_with_nfe(name):
  errors = [_error(name, n) for n in (5, 10, 25)]
  assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("name, nfe, tol", [("heun", 35, 3.5), ("dpm_solver_pp", 25, 2.5),  # Heun measured 3.08.
                                            ("dpm_solver_pp_sde", 25, 2.5)])
def test_second_order_reaches_the_data(name, nfe, tol):
  assert _error(name, nfe) < tol


@pytest.mark.parametrize("nfe", [10, 15, 20, 25, 50])
def test_dpm_solver_pp_no_worse_than_ddim(nfe):
  assert _error("dpm_solver_pp", nfe) <= _error("ddim", nfe)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heun", "dpm_solver_pp", "dpm_solver_pp_sde"])
@pytest.mark.parametrize("nfe", [15, 25, 35, 50])
def test_second_order_no_worse_than_ddim(name, nfe):
  assert _error(name, nfe) <= _error("ddim", nfe)
