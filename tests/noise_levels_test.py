"""ddpm_jax/core/noise_levels.py: sigma at fractional t, (alpha, s), the eps / x0 / v conversions.

Checked against closed forms computed here in float64 from the betas, never against the module's
own formulas, and checked to be the ones the tables' functions, the samplers, the losses,
classifier guidance and editing use.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import diffusion
from ddpm_jax.core import losses
from ddpm_jax.core import noise_levels
from ddpm_jax.core import schedules
from ddpm_jax.sampling import editing
from ddpm_jax.sampling import grids
from ddpm_jax.sampling import guidance
from ddpm_jax.sampling import loop

T = 50
EVERY_SCHEDULE = [(name, zt) for name in schedules.SCHEDULES for zt in (False, True)]


@functools.lru_cache(maxsize=None)
def _tables(name="linear", zero_terminal_snr=False, num_timesteps=T):
  return schedules.make_tables(schedules.get_beta_schedule(name, num_timesteps, zero_terminal_snr))


def _abar64(name, zero_terminal_snr, num_timesteps=T):
  """abar_k = prod_{i <= k} (1 - beta_i) in float64 from the schedule itself (DDPM eq. 4)."""
  return np.cumprod(1.0 - schedules.get_beta_schedule(name, num_timesteps, zero_terminal_snr))


# --- sigma(t) and (alpha, s) ----------------------------------------------------------------------


@pytest.mark.parametrize("name, zero_terminal_snr", EVERY_SCHEDULE)
def test_sigma_at_integer_t_is_the_tables_sigma(name, zero_terminal_snr):
  """sigma_k = sqrt((1 - abar_k) / abar_k) at every index, inf exactly where abar = 0."""
  tables, abar = _tables(name, zero_terminal_snr), _abar64(name, zero_terminal_snr)
  with np.errstate(divide="ignore"):
    want = np.sqrt((1.0 - abar) / abar)
  got = noise_levels.sigma_at(tables, np.arange(T, dtype=np.float64))
  assert got.dtype == np.float64
  np.testing.assert_array_equal(np.isinf(got), abar == 0)
  # The tables are float32: sigma inherits their rounding (~6e-8 relative per factor).
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(np.exp(noise_levels.log_sigmas(tables)), want, rtol=1e-6)
  # (alpha, s) at integer t are the tables' sqrt(abar), sqrt(1 - abar) (float32, to rounding).
  alpha, s = noise_levels.vp_at(tables, np.arange(T, dtype=np.float64))
  np.testing.assert_allclose(alpha, np.asarray(tables.sqrt_abar), rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(s, np.asarray(tables.sqrt_one_minus_abar), rtol=1e-6)
  np.testing.assert_allclose(alpha, np.sqrt(abar), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name, zero_terminal_snr", EVERY_SCHEDULE)
def test_sigma_at_fractional_t_interpolates_log_sigma(name, zero_terminal_snr):
  """log sigma(k + f) = (1 - f) log sigma_k + f log sigma_{k+1}; an infinite sigma_{T-1} is only
  reached at t = T - 1 (before it, sigma_{T-2}); t < 0 is clean data, sigma = 0."""
  tables, abar = _tables(name, zero_terminal_snr), _abar64(name, zero_terminal_snr)
  with np.errstate(divide="ignore"):
    log_sig = 0.5 * np.log((1.0 - abar) / abar)
  rng = np.random.default_rng(0)
  k = rng.integers(0, T - 2, 64)
  f = rng.uniform(0.0, 1.0, 64)
  got = noise_levels.sigma_at(tables, k + f)
  np.testing.assert_allclose(got, np.exp((1 - f) * log_sig[k] + f * log_sig[k + 1]), rtol=2e-6)
  # The last interval, with and without abar_{T-1} = 0.
  t_last = np.array([T - 1.5, T - 1.0])
  if abar[-1] == 0:
    np.testing.assert_allclose(noise_levels.sigma_at(tables, t_last)[0], np.exp(log_sig[-2]),
                               rtol=1e-6)
    assert np.isinf(noise_levels.sigma_at(tables, t_last)[1])
  else:
    np.testing.assert_allclose(noise_levels.sigma_at(tables, t_last),
                               np.exp([0.5 * (log_sig[-2] + log_sig[-1]), log_sig[-1]]), rtol=1e-6)
  np.testing.assert_array_equal(noise_levels.sigma_at(tables, np.array([-1.0, -0.25])), 0.0)
  # t_at inverts it over the finite sigmas.
  t = np.sort(rng.uniform(0.0, T - 2.0, 16))
  np.testing.assert_allclose(noise_levels.t_at(tables, noise_levels.sigma_at(tables, t)), t,
                             atol=1e-9)


@pytest.mark.parametrize("name, zero_terminal_snr", [("cosine", True), ("linear", False),
                                                     ("jsd", False), ("sigmoid", False)])
def test_sigma_at_on_jax_arrays_is_the_same_function_in_float32(name, zero_terminal_snr):
  """A (traced) jax t gives float32 jnp, equal to the float64 NumPy values to float32 rounding."""
  tables = _tables(name, zero_terminal_snr)
  t = np.concatenate([[-1.0, 0.0, 0.5, T - 1.5, T - 1.0],
                      np.random.default_rng(1).uniform(0, T - 1, 32)]).astype(np.float32)
  want = noise_levels.sigma_at(tables, t.astype(np.float64))
  got = jax.jit(lambda t_: noise_levels.sigma_at(tables, t_))(jnp.asarray(t))
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # Under vmap (scalar t per example) too.
  mapped = jax.jit(jax.vmap(lambda t_: noise_levels.sigma_at(tables, t_)))(jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(mapped), want, rtol=1e-6)
  a_np, s_np = noise_levels.vp_at(tables, t.astype(np.float64))
  a_j, s_j = jax.jit(lambda t_: noise_levels.vp_at(tables, t_))(jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(a_j), a_np, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s_j), s_np, rtol=1e-6, atol=1e-7)


def test_vp_from_sigma_closed_form_numpy_and_jnp():
  """alpha = 1 / sqrt(1 + sigma^2), s = sigma / sqrt(1 + sigma^2): alpha^2 + s^2 = 1, s / alpha =
  sigma; sigma = 0 is (1, 0) and sigma = inf is (0, 1), in NumPy and in jnp."""
  sigma = np.concatenate([[0.0, np.inf, 1e-4, 1.0, 1e4], np.exp(np.linspace(-8, 8, 33))])
  alpha, s = noise_levels.vp_from_sigma(sigma)
  assert isinstance(alpha, np.ndarray) and alpha.dtype == np.float64
  np.testing.assert_array_equal(alpha[:2], [1.0, 0.0])
  np.testing.assert_array_equal(s[:2], [0.0, 1.0])
  np.testing.assert_allclose(alpha**2 + s**2, 1.0, rtol=1e-15)
  np.testing.assert_allclose(s[2:] / alpha[2:], sigma[2:], rtol=1e-14)
  # sigma = tan(theta) with alpha = cos(theta), s = sin(theta) (finite sigmas).
  np.testing.assert_allclose(alpha[2:], np.cos(np.arctan(sigma[2:])), rtol=1e-12)
  np.testing.assert_allclose(s[2:], np.sin(np.arctan(sigma[2:])), rtol=1e-12)
  a_j, s_j = jax.jit(noise_levels.vp_from_sigma)(jnp.asarray(sigma, jnp.float32))
  assert a_j.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(a_j), alpha, rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(np.asarray(s_j), s, rtol=1e-6, atol=1e-30)


# --- eps / x0 / v ---------------------------------------------------------------------------------


def _random_point(seed=0, b=64):
  """x0, eps [B, 3] and per-example (alpha, s) [B, 1] on the unit circle, x = alpha x0 + s eps."""
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (b, 3))
  eps = rng.standard_normal((b, 3))
  alpha = rng.uniform(0.05, 0.999, (b, 1))
  s = np.sqrt(1.0 - alpha**2)
  return x0, eps, alpha, s, alpha * x0 + s * eps


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


@pytest.mark.parametrize("model_output", noise_levels.MODEL_OUTPUTS)
def test_round_trip_and_closed_forms_for_every_model_output(model_output):
  x0, eps, alpha, s, x = _random_point()
  closed = {"eps": eps, "x0": x0, "v": alpha * eps - s * x0}[model_output]  # Salimans & Ho eq.
  pred = noise_levels.output_from_x0_eps(*_f32(x0, eps, alpha, s), model_output)
  np.testing.assert_allclose(np.asarray(pred), closed, rtol=1e-6, atol=1e-6)
  x0_hat, eps_hat = noise_levels.x0_eps_from_output(*_f32(closed, x, alpha, s), model_output)
  # Inverting an x0 prediction divides by s >= 0.045: rounding of x grows by up to 1 / s.
  np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(eps_hat), eps, atol=5e-5)
  # And the conversions' own closed forms, where each is written out in the docstring.
  if model_output == "eps":
    np.testing.assert_allclose(np.asarray(x0_hat), (x - s * eps) / alpha, rtol=1e-5, atol=1e-5)
  if model_output == "x0":
    np.testing.assert_allclose(np.asarray(eps_hat), (x - alpha * x0) / s, rtol=1e-5, atol=5e-5)
  if model_output == "v":
    v = closed
    np.testing.assert_allclose(np.asarray(x0_hat), alpha * x - s * v, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eps_hat), s * x + alpha * v, atol=1e-6)


@pytest.mark.parametrize("model_output", noise_levels.MODEL_OUTPUTS)
def test_clip_keeps_x0_in_range_and_eps_consistent(model_output):
  x0, eps, alpha, s, _ = _random_point(1)
  x0 = 3.0 * x0  # Mostly outside [-1, 1].
  x = alpha * x0 + s * eps
  pred = {"eps": eps, "x0": x0, "v": alpha * eps - s * x0}[model_output]
  x0_c, eps_c = noise_levels.x0_eps_from_output(*_f32(pred, x, alpha, s), model_output,
                                                clip_x0=True)
  x0_c, eps_c = np.asarray(x0_c), np.asarray(eps_c)
  np.testing.assert_allclose(x0_c, np.clip(x0, -1, 1), atol=1e-5)
  np.testing.assert_allclose(alpha * x0_c + s * eps_c, x, atol=1e-5)  # Still describes x.


def test_alpha_zero_is_floored_not_inf():
  """abar = 0 (alpha = 0, s = 1): x0 from eps is (x - eps) / MIN_ALPHA, huge but finite."""
  x, eps = _f32(np.array([[0.5, -0.25]]), np.array([[0.25, 0.5]]))
  x0, _ = noise_levels.x0_eps_from_output(eps, x, 0.0, 1.0, "eps")
  np.testing.assert_allclose(np.asarray(x0), [[0.25e6, -0.75e6]], rtol=1e-6)
  x0, eps_c = noise_levels.x0_eps_from_output(eps, x, 0.0, 1.0, "eps", clip_x0=True)
  np.testing.assert_array_equal(np.asarray(x0), [[1.0, -1.0]])
  np.testing.assert_array_equal(np.asarray(eps_c), np.asarray(x))  # x = 0 x0 + 1 eps.


def test_unknown_model_output_raises():
  z = jnp.zeros((1, 2))
  for fn in (lambda: noise_levels.x0_eps_from_output(z, z, 1.0, 0.5, "score"),
             lambda: noise_levels.output_from_x0_eps(z, z, 1.0, 0.5, "score"),
             lambda: noise_levels.add_eps_shift(z, z, 1.0, 0.5, "score")):
    with pytest.raises(ValueError, match="'eps', 'x0', 'v'"):
      fn()


@pytest.mark.parametrize("model_output", noise_levels.MODEL_OUTPUTS)
def test_add_eps_shift_shifts_the_implied_eps_by_d(model_output):
  """At fixed x, the shifted prediction implies eps + d and the x0 that goes with it."""
  x0, eps, alpha, s, x = _random_point(2)
  d = 0.3 * np.random.default_rng(3).standard_normal(x.shape)
  pred = noise_levels.output_from_x0_eps(*_f32(x0, eps, alpha, s), model_output)
  shifted = noise_levels.add_eps_shift(pred, *_f32(d, alpha, s), model_output)
  x0_hat, eps_hat = noise_levels.x0_eps_from_output(shifted, *_f32(x, alpha, s), model_output)
  np.testing.assert_allclose(np.asarray(eps_hat), eps + d, atol=5e-5)
  np.testing.assert_allclose(np.asarray(x0_hat), (x - s * (eps + d)) / alpha, atol=5e-5)


# --- One formula at every call site --------------------------------------------------------------


@pytest.mark.parametrize("name, zero_terminal_snr", [("linear", False), ("cosine", True),
                                                     ("jsd", False)])
@pytest.mark.parametrize("model_output", noise_levels.MODEL_OUTPUTS)
def test_table_conversions_are_the_shared_ones_at_the_tables_coefficients(
    name, zero_terminal_snr, model_output):
  """diffusion.predict_x0_eps and loop.predict are x0_eps_from_output (bitwise), at the tables'
  (sqrt(abar_t), sqrt(1 - abar_t)) and at a sampler's (alpha, s) respectively."""
  tables = _tables(name, zero_terminal_snr)
  rng = np.random.default_rng(4)
  x, pred = _f32(rng.standard_normal((4, 2, 2, 1)), rng.standard_normal((4, 2, 2, 1)))
  t = jnp.array([0, 17, 33, T - 1])
  alpha = jnp.asarray(tables.sqrt_abar)[t].reshape(-1, 1, 1, 1)
  s = jnp.asarray(tables.sqrt_one_minus_abar)[t].reshape(-1, 1, 1, 1)
  for clip in (False, True):
    want = noise_levels.x0_eps_from_output(pred, x, alpha, s, model_output, clip)
    got = diffusion.predict_x0_eps(tables, pred, x, t, model_output, clip)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # The sampler's path: learned-variance channels split off, scalar coefficients.
    out = jnp.concatenate([pred, jnp.full_like(pred, 7.0)], axis=-1)
    got = loop.predict(out[:1], x[:1], alpha[0, 0, 0, 0], s[0, 0, 0, 0], model_output,
                       "learned_range", clip)
    want = noise_levels.x0_eps_from_output(pred[:1], x[:1], alpha[0, 0, 0, 0], s[0, 0, 0, 0],
                                           model_output, clip)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("model_output", noise_levels.MODEL_OUTPUTS)
def test_loss_target_is_the_closed_form(model_output):
  """A model that returns the float64 closed-form target of x_t (eps, x0 or v = sqrt(abar) eps -
  sqrt(1 - abar) x0) has zero mse."""
  tables, abar = _tables("cosine"), _abar64("cosine", False)
  rng = np.random.default_rng(5)
  x0 = rng.uniform(-1, 1, (4, 2, 2, 1))
  noise = rng.standard_normal((4, 2, 2, 1))
  t = np.array([0, 11, 30, T - 1])
  a, s = np.sqrt(abar[t]).reshape(-1, 1, 1, 1), np.sqrt(1 - abar[t]).reshape(-1, 1, 1, 1)
  target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[model_output]
  loss_fn = losses.get_loss_fn(tables, model_output=model_output)
  _, aux = loss_fn(lambda x_t, t_: jnp.asarray(target, jnp.float32), *_f32(x0), jnp.asarray(t),
                   *_f32(noise))
  np.testing.assert_allclose(np.asarray(aux["mse"]), 0.0, atol=1e-12)


@pytest.mark.parametrize("name, zero_terminal_snr", [("linear", False), ("cosine", True),
                                                     ("jsd", False), ("sigmoid", False)])
def test_guidance_and_editing_use_the_samplers_coefficients(name, zero_terminal_snr):
  """Classifier guidance at the t a sampler calls the model with (its grid, in float32) sees the
  sampler's own (alpha, s) at that t, to float32 rounding; editing's q(x_t | x0) too."""
  tables = _tables(name, zero_terminal_snr)
  vpc = jax.jit(lambda t_: guidance.vp_coefficients(tables, t_))
  for grid_name in grids.GRIDS:
    t32 = jnp.asarray(grids.make_grid(grid_name, tables, 12), jnp.float32)  # What the model sees.
    lv = loop.levels(tables, np.asarray(t32, np.float64))
    alpha, s = vpc(t32)
    np.testing.assert_allclose(np.asarray(alpha), lv.alpha, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s), lv.s, rtol=2e-6, atol=1e-7)
  # Between T - 2 and T - 1 (where abar_{T-1} = 0 used to be capped differently) and at T - 1.
  t = jnp.array([T - 1.5, T - 1.0, 0.25], jnp.float32)
  lv_alpha, lv_s = noise_levels.vp_at(tables, np.asarray(t, np.float64))
  alpha, s = vpc(t)
  np.testing.assert_allclose(np.asarray(alpha), lv_alpha, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s), lv_s, rtol=2e-6, atol=1e-7)

  # The classifier's eps shift (Algorithm 2) is -scale s(t) grad, with that s(t).
  rng = np.random.default_rng(6)
  x, w = _f32(rng.standard_normal((3, 2, 2, 1)), rng.standard_normal((3, 2, 2, 1)))
  log_prob = lambda x_, t_: jax.nn.log_softmax(
      jnp.stack([jnp.sum(w * x_, (1, 2, 3)), jnp.zeros(x_.shape[:1])], -1))
  labels = jnp.zeros((3,), jnp.int32)
  grad = np.asarray(guidance.classifier_grad(log_prob, x, t, labels))
  model = lambda x_, t_: jnp.zeros_like(x_)
  for model_output in noise_levels.MODEL_OUTPUTS:
    fn = guidance.classifier_guidance(model, log_prob, labels, 2.0, tables,
                                      model_output=model_output, model_var="fixed_small")
    x0_hat, eps_hat = noise_levels.x0_eps_from_output(
        jax.jit(fn)(x, t), x, *_f32(lv_alpha.reshape(-1, 1, 1, 1), lv_s.reshape(-1, 1, 1, 1)),
        model_output)
    _, eps0 = noise_levels.x0_eps_from_output(
        jnp.zeros_like(x), x, *_f32(lv_alpha.reshape(-1, 1, 1, 1), lv_s.reshape(-1, 1, 1, 1)),
        model_output)
    want = np.asarray(eps0) - 2.0 * lv_s.reshape(-1, 1, 1, 1) * grad
    finite = lv_alpha > 0  # At alpha = 0 an x0 or v model cannot express eps (floored 1/alpha).
    np.testing.assert_allclose(np.asarray(eps_hat)[finite], want[finite], rtol=1e-5, atol=1e-5)

  # Editing: q(x_t | x0) = alpha(t) x0 + s(t) z at the same (alpha, s); t = -1 is x0 itself.
  x0, z = _f32(rng.uniform(-1, 1, (3, 2, 2, 1)), rng.standard_normal((3, 2, 2, 1)))
  got = jax.jit(lambda t_: editing.q_sample_at(tables, x0, t_, z))(t)
  want = lv_alpha.reshape(-1, 1, 1, 1) * np.asarray(x0) + lv_s.reshape(-1, 1, 1, 1) * np.asarray(z)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6)
  clean = jax.jit(lambda t_: editing.q_sample_at(tables, x0, t_, z))(jnp.full((3,), -1.0))
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(x0))


def test_old_names_are_the_core_functions():
  assert grids.sigma_at is noise_levels.sigma_at
  assert grids.log_sigmas is noise_levels.log_sigmas
  assert grids.t_at is noise_levels.t_at
  assert diffusion.MODEL_OUTPUTS is noise_levels.MODEL_OUTPUTS
