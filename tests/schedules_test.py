"""Tests of the noise schedules and their derived tables against their papers' definitions."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import schedules

ALL = sorted(schedules.SCHEDULES)
VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def _reference_betas(name, t):
  """The DDPM-code definitions, written out independently of `schedules`."""
  if name == "linear":
    return np.linspace(1e-4, 0.02, t, dtype=np.float64)
  if name == "quad":
    return np.linspace(1e-4**0.5, 0.02**0.5, t, dtype=np.float64) ** 2
  if name in ("warmup10", "warmup50"):
    n = int(t * {"warmup10": 0.1, "warmup50": 0.5}[name])
    betas = 0.02 * np.ones(t, dtype=np.float64)
    betas[:n] = np.linspace(1e-4, 0.02, n, dtype=np.float64)
    return betas
  if name == "const":
    return 0.02 * np.ones(t, dtype=np.float64)
  if name == "jsd":
    return 1.0 / np.linspace(t, 1, t, dtype=np.float64)
  raise AssertionError(name)


def _cosine_abar(u, s=0.008):
  f = lambda v: np.cos((v + s) / (1 + s) * math.pi / 2) ** 2
  return f(u) / f(0.0)


def _sigmoid_abar(u, start=-3.0, end=3.0, tau=1.0):
  sig = lambda z: 1 / (1 + np.exp(-z))
  return (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau)
                                                                      - sig(start / tau))


@pytest.mark.parametrize("name", ["linear", "quad", "warmup10", "warmup50", "const", "jsd"])
@pytest.mark.parametrize("t", [10, 1000, 1001])
def test_parity_with_reference_bit_for_bit(name, t):
  assert np.array_equal(schedules.get_beta_schedule(name, t), _reference_betas(name, t))


@pytest.mark.parametrize("name,abar_fn", [("cosine", _cosine_abar), ("sigmoid", _sigmoid_abar)])
@pytest.mark.parametrize("t", [50, 1000])
def test_abar_defined_schedules_follow_their_abar(name, abar_fn, t):
  betas = schedules.get_beta_schedule(name, t)
  expected = abar_fn(np.arange(1, t + 1) / t)
  clipped = betas >= schedules.MAX_BETA
  # Only the final step is clipped (abar(1) = 0 would give beta = 1 there).
  assert clipped[-1] and not clipped[:-1].any()
  np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], expected[:-1], rtol=1e-10, atol=1e-15)
  assert betas[-1] == schedules.MAX_BETA


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_shape_dtype_range_monotone(name, zero_terminal_snr):
  t = 100
  betas = schedules.get_beta_schedule(name, t, zero_terminal_snr=zero_terminal_snr)
  assert betas.shape == (t,) and betas.dtype == np.float64
  assert np.all(betas > 0) and np.all(betas <= 1)
  # Every schedule in the table is non-decreasing in t, and rescaling keeps that.
  assert np.all(np.diff(betas) >= 0)
  abar = np.cumprod(1 - betas)
  assert np.all(np.diff(abar) < 0)


@pytest.mark.parametrize("name", ALL)
def test_zero_terminal_snr(name):
  t = 100
  original = schedules.get_beta_schedule(name, t)
  rescaled = schedules.get_beta_schedule(name, t, zero_terminal_snr=True)
  abar = np.cumprod(1 - rescaled)
  assert abar[-1] == 0.0
  # The first step is kept up to the rounding of 1 - (sqrt(1 - beta_1))^2.
  np.testing.assert_allclose(rescaled[0], original[0], rtol=0, atol=1e-15)
  # Lin et al. 2023: sqrt(abar) is an affine map of the original sqrt(abar).
  s_old, s_new = np.sqrt(np.cumprod(1 - original)), np.sqrt(abar)
  slope = (s_new[0] - s_new[-1]) / (s_old[0] - s_old[-1])
  np.testing.assert_allclose(s_new, (s_old - s_old[-1]) * slope, atol=1e-12)
  tables = schedules.make_tables(rescaled)
  assert float(tables.snr[-1]) == 0.0
  for field in dataclasses.fields(tables):
    if field.name != "log_snr":  # log SNR_T = -inf is the point of the rescaling.
      assert np.all(np.isfinite(getattr(tables, field.name))), field.name


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="cosine") as info:
    schedules.get_beta_schedule("cosin", 10)
  for name in ALL:
    assert name in str(info.value)


def test_too_few_steps_raises():
  with pytest.raises(ValueError):
    schedules.get_beta_schedule("linear", 1)


@pytest.mark.parametrize("name", ALL)
def test_tables_match_reference_formulas(name):
  betas = schedules.get_beta_schedule(name, 100)
  tables = schedules.make_tables(betas, jnp.float32)
  alphas = 1 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  beta_tilde = betas * (1 - abar_prev) / (1 - abar)
  expected = {
      "alphas": alphas,
      "abar": abar,
      "abar_prev": abar_prev,
      "posterior_variance": beta_tilde,
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
      "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(alphas) / (1 - abar),
      "snr": abar / (1 - abar),
      "fixed_large_variance": np.concatenate([[beta_tilde[1]], betas[1:]]),
      "posterior_log_variance_clipped": np.log(np.concatenate([[beta_tilde[1]], beta_tilde[1:]])),
  }
  for key, value in expected.items():
    got = np.asarray(getattr(tables, key), np.float64)
    np.testing.assert_allclose(got, value, rtol=2e-6, atol=1e-30, err_msg=key)
  assert tables.num_timesteps == 100
  assert float(tables.abar_prev[0]) == 1.0
  assert float(tables.posterior_variance[0]) == 0.0
  assert tables.posterior_log_variance_clipped[0] == tables.posterior_log_variance_clipped[1]
  assert tables.fixed_large_variance[0] == tables.posterior_variance[1]
  np.testing.assert_allclose(np.exp(tables.fixed_large_log_variance),
                             tables.fixed_large_variance, rtol=1e-6)


def test_make_tables_rejects_bad_betas():
  with pytest.raises(ValueError):
    schedules.make_tables(np.array([0.1, 0.0, 0.2]))
  with pytest.raises(ValueError):
    schedules.make_tables(np.array([0.1, 1.5]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tables_are_a_pytree_through_jit(variant):
  tables = schedules.make_tables(schedules.get_beta_schedule("linear", 20))
  assert len(jax.tree.leaves(tables)) == len(dataclasses.fields(tables))

  @variant
  def f(tb, t):
    return tb.abar[t] * 2.0, tb

  value, out = f(tables, jnp.int32(3))
  np.testing.assert_allclose(value, 2 * tables.abar[3])
  assert isinstance(out, schedules.DiffusionTables)
  jax.tree.map(np.testing.assert_array_equal, out, tables)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tables_cast_to_compute_dtype(dtype):
  betas = schedules.get_beta_schedule("cosine", 50)
  tables = schedules.make_tables(betas, dtype)
  reference = schedules.make_tables(betas, jnp.float32)
  rtol = {jnp.float32: 0, jnp.bfloat16: 1e-2}[dtype]
  for field in dataclasses.fields(tables):
    key = field.name
    leaf, ref = getattr(tables, key), getattr(reference, key)
    assert leaf.dtype == dtype and leaf.shape == (50,), key
    np.testing.assert_allclose(np.asarray(leaf, np.float32), ref, rtol=rtol, err_msg=key)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_log_snr_is_log_abar_over_one_minus_abar_and_minus_twice_log_sigma(name,
                                                                          zero_terminal_snr):
  """The log-SNR table (plotted by the schedule sweep) is log(abar / (1 - abar)) in float64, and
  the samplers' noise level is sigma = exp(-log_snr / 2): a factor off either way fails here."""
  from ddpm_jax.core import noise_levels  # pylint: disable=g-import-not-at-top
  betas = schedules.get_beta_schedule(name, 1000, zero_terminal_snr)
  tables = schedules.make_tables(betas)
  abar = np.cumprod(1.0 - betas)
  with np.errstate(divide="ignore"):
    expected = np.log(abar) - np.log1p(-abar)
  finite = np.isfinite(expected)
  np.testing.assert_allclose(np.asarray(tables.log_snr, np.float64)[finite], expected[finite],
                             rtol=1e-5, atol=1e-5)
  assert np.array_equal(np.isneginf(np.asarray(tables.log_snr)), np.isneginf(expected))
  np.testing.assert_allclose(-2.0 * noise_levels.log_sigmas(tables)[finite], expected[finite],
                             rtol=1e-5, atol=1e-5)
