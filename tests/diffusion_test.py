"""Tests of the forward process, its posterior and the reverse-step parameterisations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import diffusion
from ddpm_jax.core import schedules

T = 100
SHAPE = (4, 3, 3, 2)  # [B, H, W, C]
VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


@functools.lru_cache(maxsize=None)
def _tables(name="linear", t=T):
  return schedules.make_tables(schedules.get_beta_schedule(name, t))


def _normal(seed, shape=SHAPE):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _data(seed=0):
  return jax.random.uniform(jax.random.key(seed), SHAPE, jnp.float32, -1.0, 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_bayes_rule(variant, name):
  """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), completed square for scalars."""
  tables = _tables(name)
  betas = schedules.get_beta_schedule(name, T)
  abar = np.cumprod(1 - betas)
  t = np.arange(1, T)  # Index 0 (paper t = 1) is a point mass, checked below.
  x0 = np.linspace(-1, 1, T - 1)
  x_t = np.linspace(2, -2, T - 1)
  # Likelihood: x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, so as a function of x_{t-1} it has
  # precision alpha_t / beta_t around x_t / sqrt(alpha_t). Prior: N(sqrt(abar_{t-1}) x_0,
  # 1 - abar_{t-1}). Precisions add, precision-weighted means add.
  alpha, beta, abar_prev = 1 - betas[t], betas[t], abar[t - 1]
  precision = alpha / beta + 1 / (1 - abar_prev)
  var = 1 / precision
  mean = var * (np.sqrt(alpha) / beta * x_t + np.sqrt(abar_prev) / (1 - abar_prev) * x0)

  fn = variant(lambda a, b, c: diffusion.q_posterior_mean_variance(tables, a, b, c))
  got_mean, got_var, got_log_var = fn(jnp.asarray(x0, jnp.float32),
                                      jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_var, var, rtol=1e-5)
  np.testing.assert_allclose(got_log_var, np.log(var), rtol=1e-5, atol=1e-5)

  # At t = 1 there is no uncertainty left: the posterior is the point mass at x_0.
  x0_1, x_t_1 = jnp.array([0.3, -0.7]), jnp.array([5.0, 1.0])
  mean_1, var_1, _ = fn(x0_1, x_t_1, jnp.zeros((2,), jnp.int32))
  np.testing.assert_allclose(mean_1, x0_1, rtol=1e-6)
  np.testing.assert_array_equal(var_1, 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_q_mean_variance_matches_eq4(variant):
  tables, x0 = _tables(), _data()
  t = jnp.array([0, 10, 50, T - 1])
  mean, var, log_var = variant(lambda a, b: diffusion.q_mean_variance(tables, a, b))(x0, t)
  abar = np.cumprod(1 - schedules.get_beta_schedule("linear", T))[np.asarray(t)]
  abar = abar[:, None, None, None]
  np.testing.assert_allclose(mean, np.sqrt(abar) * x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, np.broadcast_to(1 - abar, SHAPE), rtol=1e-5)
  np.testing.assert_allclose(log_var, np.log(np.broadcast_to(1 - abar, SHAPE)), rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trips_x0_eps_v_for_all_t(variant):
  tables = _tables()
  shape = (T, 2, 2, 1)
  x0 = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
  eps = _normal(2, shape)
  t = jnp.arange(T)

  @variant
  def round_trip(x0, eps):
    x_t = diffusion.q_sample(tables, x0, t, eps)
    v = diffusion.v_from_x0_eps(tables, x0, t, eps)
    return (diffusion.x0_from_eps(tables, x_t, t, eps), diffusion.eps_from_x0(tables, x_t, t, x0),
            diffusion.x0_from_v(tables, x_t, t, v), diffusion.eps_from_v(tables, x_t, t, v))

  x0_e, eps_x, x0_v, eps_v = round_trip(x0, eps)
  np.testing.assert_allclose(x0_e, x0, atol=2e-5)
  np.testing.assert_allclose(x0_v, x0, atol=2e-5)
  np.testing.assert_allclose(eps_v, eps, atol=2e-5)
  # eps from x0 divides by sqrt(1/abar - 1) ~ 0.01 at t = 1, which magnifies rounding ~100x.
  np.testing.assert_allclose(eps_x, eps, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_q_sample_moments(variant):
  tables = _tables()
  n = 20000
  t = jnp.array([0, 30, T - 1])
  x0 = jnp.array([0.9, -0.5, 0.2])
  noise = _normal(3, (n, 3))

  @variant
  def sample(noise):
    return jax.vmap(lambda z: diffusion.q_sample(tables, x0, t, z))(noise)

  samples = np.asarray(sample(noise), np.float64)
  abar = np.asarray(tables.abar, np.float64)[np.asarray(t)]
  mean, var = np.sqrt(abar) * np.asarray(x0), 1 - abar
  # Five standard errors: sd(mean) = sqrt(var/n), sd(sample variance) = var sqrt(2/(n-1)).
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(samples.var(0, ddof=1) - var), 5 * var * np.sqrt(2 / (n - 1)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_output", diffusion.MODEL_OUTPUTS)
def test_p_mean_with_oracle_is_true_posterior_mean(variant, model_output):
  tables, x0, eps = _tables(), _data(4), _normal(5)
  t = jnp.array([5, 20, 40, 60])
  x_t = diffusion.q_sample(tables, x0, t, eps)
  oracle = {"eps": eps, "x0": x0, "v": diffusion.v_from_x0_eps(tables, x0, t, eps)}[model_output]
  fn = variant(lambda out, x_t: diffusion.p_mean_variance(
      tables, out, x_t, t, model_output=model_output, model_var="fixed_small", clip_x0=False))
  p = fn(oracle, x_t)
  true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(tables, x0, x_t, t)
  np.testing.assert_allclose(p.mean, true_mean, atol=1e-4)
  np.testing.assert_allclose(p.log_var, true_log_var, rtol=1e-6)
  np.testing.assert_allclose(p.pred_x0, x0, atol=1e-4)
  np.testing.assert_allclose(p.pred_eps, eps, atol=1e-3)


def test_clip_x0_clips_and_keeps_eps_consistent():
  tables = _tables()
  t = jnp.full((SHAPE[0],), 50)
  x_t = 3.0 * _normal(6)
  eps = _normal(7)
  x0, eps_hat = diffusion.predict_x0_eps(tables, eps, x_t, t, "eps", clip_x0=True)
  assert float(jnp.max(jnp.abs(x0))) <= 1.0
  assert float(jnp.max(jnp.abs(diffusion.x0_from_eps(tables, x_t, t, eps)))) > 1.0
  np.testing.assert_allclose(diffusion.x0_from_eps(tables, x_t, t, eps_hat), x0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_model_var_gives_its_reference_variance(variant):
  tables = _tables()
  betas = schedules.get_beta_schedule("linear", T)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  beta_tilde = betas * (1 - abar_prev) / (1 - abar)
  t = jnp.arange(T)
  shape = (T, 2)
  x_t = _normal(8, shape)
  var_out = _normal(9, shape)

  def log_var(model_var, v):
    pred = jnp.zeros(shape)
    out = jnp.concatenate([pred, v], -1) if model_var in diffusion.LEARNED_VARS else pred
    return variant(lambda o, x: diffusion.p_mean_variance(
        tables, o, x, t, model_var=model_var).log_var)(out, x_t)

  clipped = np.log(np.append(beta_tilde[1], beta_tilde[1:]))[:, None]
  large = np.log(np.append(beta_tilde[1], betas[1:]))[:, None]
  np.testing.assert_allclose(log_var("fixed_small", None), np.broadcast_to(clipped, shape),
                             rtol=1e-5)
  np.testing.assert_allclose(log_var("fixed_large", None), np.broadcast_to(large, shape),
                             rtol=1e-5)
  np.testing.assert_allclose(log_var("learned", var_out), var_out, rtol=1e-6)
  # learned_range: v = +1 is log beta, v = -1 is the clipped log beta_tilde, v = 0 halfway.
  ones = jnp.ones(shape)
  np.testing.assert_allclose(log_var("learned_range", ones),
                             np.broadcast_to(np.log(betas)[:, None], shape), rtol=1e-5)
  np.testing.assert_allclose(log_var("learned_range", -ones), np.broadcast_to(clipped, shape),
                             rtol=1e-5)
  np.testing.assert_allclose(log_var("learned_range", 0 * ones),
                             np.broadcast_to((np.log(betas)[:, None] + clipped) / 2, shape),
                             rtol=1e-5)


def test_split_model_output():
  out = jnp.arange(12.0).reshape(1, 2, 6)
  pred, var = diffusion.split_model_output(out, "learned_range")
  np.testing.assert_array_equal(pred, out[..., :3])
  np.testing.assert_array_equal(var, out[..., 3:])
  pred, var = diffusion.split_model_output(out, "fixed_large")
  assert pred is out and var is None


@pytest.mark.parametrize("model_var", diffusion.MODEL_VARS)
@pytest.mark.parametrize("model_output", diffusion.MODEL_OUTPUTS)
def test_vmap_with_scalar_t_equals_batched_call(model_output, model_var):
  tables, x0, eps = _tables(), _data(10), _normal(11)
  t = jnp.array([0, 7, 42, T - 1])
  channels = 2 * SHAPE[-1] if model_var in diffusion.LEARNED_VARS else SHAPE[-1]
  out = jax.random.uniform(jax.random.key(12), SHAPE[:-1] + (channels,), minval=-1, maxval=1)

  def everything(x0, eps, out, t):
    x_t = diffusion.q_sample(tables, x0, t, eps)
    p = diffusion.p_mean_variance(tables, out, x_t, t, model_output=model_output,
                                  model_var=model_var, clip_x0=True)
    return (x_t, diffusion.q_posterior_mean_variance(tables, x0, x_t, t),
            diffusion.v_from_x0_eps(tables, x0, t, eps), p)

  batched = everything(x0, eps, out, t)
  mapped = jax.jit(jax.vmap(everything))(x0, eps, out, t)
  # Jit fuses and reorders what the eager call computes op by op, so the two agree to the float32
  # rounding of the operands, not bitwise. Each leaf is a few (<= 8) float32 ops on operands of
  # size at most `scale`: |difference| <= 8 eps scale. pred_eps is the exception: with clip_x0 it
  # is recomputed as (x_t - sqrt(abar) x0) / sqrt(1 - abar), so the rounding of that difference
  # is divided by sqrt(1 - abar_t) (0.03 at t = 0 here).
  scale = 1 + float(jnp.abs(batched[0]).max()) + float(jnp.abs(out).max())
  bound = 8 * np.finfo(np.float32).eps * scale
  s_t = np.asarray(tables.sqrt_one_minus_abar)[np.asarray(t)].reshape(-1, 1, 1, 1)
  want = jax.tree.leaves(batched)
  have, _ = jax.tree_util.tree_flatten_with_path(mapped)
  assert len(have) == len(want) == 10  # x_t, q_posterior (3), v and p_mean_variance (5)
  for (path, got), expected in zip(have, want, strict=True):
    name = jax.tree_util.keystr(path)
    atol = bound / s_t if name.endswith(".pred_eps") else bound
    diff = np.abs(np.asarray(got) - np.asarray(expected))
    assert np.all(diff <= atol), (name, float(diff.max()))


def test_unknown_names_raise():
  tables, x = _tables(), _data()
  t = jnp.zeros((SHAPE[0],), jnp.int32)
  with pytest.raises(ValueError, match="'eps', 'x0', 'v'"):
    diffusion.p_mean_variance(tables, x, x, t, model_output="score")
  with pytest.raises(ValueError, match="fixed_small"):
    diffusion.p_mean_variance(tables, x, x, t, model_var="learnt")


def test_q_variance_is_accurate_in_bfloat16():
  # 1 - abar_1 = 1e-4 cancels to 0 if formed in bfloat16, where 0.9999 rounds to 1.
  tables = schedules.make_tables(schedules.get_beta_schedule("linear", T), jnp.bfloat16)
  _, var, _ = diffusion.q_mean_variance(tables, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(np.asarray(var, np.float32), 1e-4, rtol=1e-2)
