"""Tests of the losses, the bound in bits/dim and the sampling of timesteps."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax.core import diffusion
from ddpm_jax.core import losses
from ddpm_jax.core import schedules

T = 50
SHAPE = (4, 2, 2, 3)  # [B, H, W, C]
VARIANTS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
LOG2 = math.log(2.0)


@functools.lru_cache(maxsize=None)
def _tables(name="linear", t=T, zero_terminal_snr=False):
  return schedules.make_tables(schedules.get_beta_schedule(name, t, zero_terminal_snr))


def _batch(seed=0, shape=SHAPE):
  """Data on the 256-level pixel grid in [-1, 1], and Gaussian noise."""
  kx, kn = jax.random.split(jax.random.key(seed))
  x0 = jax.random.randint(kx, shape, 0, 256).astype(jnp.float32) * 2 / 255 - 1
  return x0, jax.random.normal(kn, shape)


def _oracle(tables, x0, noise, model_output, extra=None):
  """A model that returns the exact target for the (x0, noise) the loss will use."""
  def model_fn(x_t, t):
    del x_t
    out = {"eps": noise, "x0": x0, "v": diffusion.v_from_x0_eps(tables, x0, t, noise)}
    out = out[model_output]
    return out if extra is None else jnp.concatenate([out, extra], -1)
  return model_fn


# --- normal_kl and the discretised decoder ---------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_normal_kl(variant):
  kl = variant(losses.normal_kl)
  m, lv = jax.random.normal(jax.random.key(0), (2, 7))
  np.testing.assert_allclose(kl(m, lv, m, lv), 0.0, atol=1e-6)
  # One pair against numerical integration of p log(p/q).
  m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(2.0)
  x = np.linspace(-12, 12, 200001)
  p = stats.norm.pdf(x, m1, math.exp(lv1 / 2))
  q = stats.norm.pdf(x, m2, math.exp(lv2 / 2))
  numeric = np.trapezoid(p * np.log(p / q), x)
  np.testing.assert_allclose(kl(m1, lv1, m2, lv2), numeric, rtol=1e-5)
  assert float(kl(m1, lv1, m2, lv2)) > 0 and float(kl(m2, lv2, m1, lv1)) > 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.37, math.log(0.003)),
                                            (-1.4, math.log(0.5)), (0.9, math.log(3.0)),
                                            (-1.0, math.log(1e-4))])
def test_bin_probabilities_sum_to_one(variant, mean, log_scale):
  centres = jnp.linspace(-1.0, 1.0, 256)
  log_p = variant(losses.discretized_gaussian_log_likelihood)(
      centres, jnp.float32(mean), jnp.float32(log_scale))
  assert log_p.shape == (256,) and bool(jnp.all(log_p <= 0))
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_p)), 1.0, rtol=1e-5)


def test_bin_probabilities_match_scipy_including_upper_tail():
  x = jnp.array([-1.0, 1.0, 0.6, -0.6, 0.0, 51 * 2 / 255 - 1])
  mean, scale = 0.0, 0.1
  got = losses.discretized_gaussian_log_likelihood(x, mean, jnp.log(scale))
  xs = np.asarray(x, np.float64)
  upper, lower = (xs + 1 / 255 - mean) / scale, (xs - 1 / 255 - mean) / scale
  with np.errstate(divide="ignore"):
    expected = np.log(stats.norm.sf(lower) - stats.norm.sf(upper))
  expected[0] = stats.norm.logcdf(upper[0])
  expected[1] = stats.norm.logsf(lower[1])
  # The edge bins are 10 sd out (p ~ 1e-23), so they hit the 1e-12 floor.
  expected = np.maximum(expected, np.log(1e-12))
  # x = +-0.6 is 6 sd out (p ~ 1e-10): the upper tail needs the mirrored difference, because
  # Phi(6.04) - Phi(5.96) is 0 in float32.
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_decoder_far_off_is_floored_not_inf():
  log_p = losses.discretized_gaussian_log_likelihood(jnp.array([1.0, 0.0]), -1.0, math.log(1e-3))
  np.testing.assert_allclose(log_p, math.log(1e-12), rtol=1e-6)


# --- Loss functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_output", diffusion.MODEL_OUTPUTS)
def test_oracle_has_zero_mse_under_every_weighting(variant, model_output):
  tables = _tables()
  x0, noise = _batch(1)
  t = jnp.array([0, 10, 30, T - 1])
  loss_fns = [losses.get_loss_fn(tables, loss="mse", model_output=model_output, weighting=w)
              for w in losses.WEIGHTINGS]

  @variant
  def run(x0, t, n):  # Every weighting in one jit: one compile instead of three.
    model_fn = _oracle(tables, x0, n, model_output)
    return [fn(model_fn, x0, t, n) for fn in loss_fns]

  for weighting, (loss, aux) in zip(losses.WEIGHTINGS, run(x0, t, noise)):
    assert loss.shape == (SHAPE[0],) and loss.dtype == jnp.float32, weighting
    np.testing.assert_allclose(loss, 0.0, atol=1e-10, err_msg=weighting)
    np.testing.assert_allclose(aux["mse"], 0.0, atol=1e-10, err_msg=weighting)
  # And a wrong model is penalised: the check above is not vacuous.
  wrong, _ = loss_fns[0](lambda x_t, t: jnp.zeros_like(x_t), x0, t, noise)
  assert bool(jnp.all(wrong > 0))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_output", diffusion.MODEL_OUTPUTS)
def test_kl_loss_of_oracle_with_posterior_variance_is_zero(variant, model_output):
  tables = _tables()
  x0, noise = _batch(2)
  t = jnp.array([1, 5, 25, T - 1])  # t > 0: KL terms, not the decoder.
  small = losses.get_loss_fn(tables, loss="kl", model_output=model_output, model_var="fixed_small")
  large = losses.get_loss_fn(tables, loss="kl", model_output=model_output, model_var="fixed_large")
  run = lambda fn: variant(lambda x0, t, n: fn(_oracle(tables, x0, n, model_output), x0, t, n))
  loss, aux = run(small)(x0, t, noise)
  np.testing.assert_allclose(loss, 0.0, atol=1e-4)
  np.testing.assert_allclose(T * aux["vlb"], loss, rtol=1e-6)
  # With beta instead of beta_tilde only the variance is off: KL = (log(b/bt) + bt/b - 1)/2.
  loss_large, _ = run(large)(x0, t, noise)
  b = np.asarray(tables.betas)[np.asarray(t)]
  bt = np.asarray(tables.posterior_variance)[np.asarray(t)]
  np.testing.assert_allclose(loss_large, T * 0.5 * (np.log(b / bt) + bt / b - 1) / LOG2,
                             rtol=1e-3)


def _two_part_model():
  """model_fn whose mean and variance channels come from separate parameters."""
  def model_fn(params, x_t, t):
    del t
    return jnp.concatenate([params["mean"] * jnp.ones_like(x_t),
                            params["var"] * jnp.ones_like(x_t)], -1)
  params = {"mean": jnp.full(SHAPE[-1:], 0.3), "var": jnp.full(SHAPE[-1:], -0.2)}
  return model_fn, params


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_output", diffusion.MODEL_OUTPUTS)
def test_hybrid_trains_mean_by_mse_and_variance_by_vlb(variant, model_output):
  tables = _tables()
  x0, noise = _batch(3)
  t = jnp.array([0, 3, 20, T - 1])
  model_fn, params = _two_part_model()
  kwargs = dict(model_output=model_output, model_var="learned_range", weighting="p2")
  hybrid = losses.get_loss_fn(tables, loss="hybrid", hybrid_lambda=0.01, **kwargs)
  kl = losses.get_loss_fn(tables, loss="kl", **kwargs)

  def grad(loss_fn):
    fn = lambda p: jnp.mean(loss_fn(functools.partial(model_fn, p), x0, t, noise)[0])
    return variant(jax.grad(fn))(params)

  g_hybrid, g_kl = grad(hybrid), grad(kl)
  # The mse term alone, written out: it sees only the mean channels.
  target = {"eps": noise, "x0": x0, "v": diffusion.v_from_x0_eps(tables, x0, t, noise)}
  weight = 1.0 / (1.0 + tables.snr[t])

  def mse(p):
    per_example = jnp.mean(jnp.square(target[model_output] - p["mean"]), axis=(1, 2, 3))
    return jnp.mean(weight * per_example)

  np.testing.assert_allclose(g_hybrid["mean"], jax.grad(mse)(params)["mean"], rtol=1e-5)
  np.testing.assert_allclose(g_hybrid["var"], 0.01 * g_kl["var"], rtol=1e-4)
  # Without the stop-gradient the bound would also move the mean.
  assert float(jnp.max(jnp.abs(g_kl["mean"]))) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_output", diffusion.MODEL_OUTPUTS)
def test_weightings(variant, model_output):
  tables = _tables("linear", T, zero_terminal_snr=True)
  x0, noise = _batch(4)
  t = jnp.array([0, 5, 30, T - 1])  # SNR_T = 0 at the last index.
  snr = np.asarray(tables.snr, np.float64)[np.asarray(t)]
  model_fn = lambda x_t, t: 0.5 * x_t

  settings = [
      (dict(weighting="none"), np.ones_like(snr)),
      (dict(weighting="p2", p2_k=1.0, p2_gamma=0.5), (1 + snr) ** -0.5),
      (dict(weighting="min_snr", min_snr_gamma=5.0),
       {"eps": np.minimum(1, 5 / np.maximum(snr, 1e-300)), "x0": np.minimum(snr, 5),
        "v": np.minimum(snr, 5) / (snr + 1)}[model_output]),
      # P2 with gamma = 0 is the plain loss, and so is min-SNR for eps with gamma above every SNR.
      (dict(weighting="p2", p2_gamma=0.0), np.ones_like(snr)),
      (dict(weighting="min_snr", min_snr_gamma=1e30),
       {"eps": np.ones_like(snr), "x0": snr, "v": snr / (snr + 1)}[model_output]),
  ]
  loss_fns = [losses.get_loss_fn(tables, model_output=model_output, **kwargs)
              for kwargs, _ in settings]
  outs = variant(lambda x0, t, n: [fn(model_fn, x0, t, n) for fn in loss_fns])(x0, t, noise)
  base, aux = outs[0]
  np.testing.assert_allclose(base, aux["mse"])
  for (kwargs, weight), (loss, aux) in zip(settings, outs):
    assert bool(jnp.all(jnp.isfinite(loss))), kwargs
    np.testing.assert_allclose(aux["weight"], weight, rtol=1e-5, err_msg=str(kwargs))
    np.testing.assert_allclose(loss, weight * np.asarray(base), rtol=1e-5, err_msg=str(kwargs))


def test_losses_are_per_example_and_float32():
  tables = _tables()
  x0, noise = _batch(5)
  t = jnp.array([0, 3, 20, T - 1])
  model_fn, params = _two_part_model()
  model = lambda x_t, t: model_fn(params, x_t, t).astype(jnp.bfloat16)
  loss_fn = losses.get_loss_fn(tables, loss="hybrid", model_var="learned_range")
  batched, aux = jax.jit(lambda *a: loss_fn(model, *a))(x0, t, noise)
  single = jax.jit(jax.vmap(lambda *a: loss_fn(model, *(b[None] for b in a))[0][0]))(
      x0, t, noise)
  assert batched.dtype == jnp.float32 and set(aux) >= {"mse", "vlb"}
  np.testing.assert_allclose(batched, single, rtol=1e-5)
  np.testing.assert_allclose(batched, aux["mse"] + 0.001 * T * aux["vlb"], rtol=1e-5)


def test_bad_arguments_raise():
  tables = _tables()
  for model_var in diffusion.LEARNED_VARS:
    with pytest.raises(ValueError, match="hybrid"):
      losses.get_loss_fn(tables, loss="mse", model_var=model_var)
  losses.get_loss_fn(tables, loss="hybrid", model_var="learned")  # Allowed.
  for kwargs, valid in [(dict(loss="l2"), "hybrid"), (dict(model_output="score"), "x0"),
                        (dict(model_var="fixed"), "fixed_small"),
                        (dict(weighting="snr"), "min_snr")]:
    with pytest.raises(ValueError, match=valid):
      losses.get_loss_fn(tables, **kwargs)
  with pytest.raises(ValueError):
    losses.get_loss_fn(tables, weighting="p2", p2_k=0.0)
  with pytest.raises(ValueError, match="importance"):
    losses.sample_timesteps(jax.random.key(0), 4, T, "stratified")
  with pytest.raises(ValueError):
    losses.sample_timesteps(jax.random.key(0), 4, T, "importance")


# --- The bound in bits/dim -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_prior_bpd_is_tiny_for_linear_1000(variant):
  tables = _tables("linear", 1000)
  x0, _ = _batch(6)
  prior = variant(losses.prior_bpd)(tables, x0)
  abar = np.prod(1 - schedules.get_beta_schedule("linear", 1000))
  x = np.asarray(x0, np.float64).reshape(SHAPE[0], -1)
  expected = 0.5 * (abar * x**2 - abar - np.log(1 - abar)).mean(1) / LOG2
  assert prior.shape == (SHAPE[0],) and bool(jnp.all(prior < 5e-5))
  np.testing.assert_allclose(prior, expected, rtol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_var", ["fixed_small", "fixed_large"])
def test_vlb_bpd_of_exact_model_for_point_masses(variant, model_var):
  """Each example is a point mass c, so eps_from_x0(x_t, c) is the exact denoiser and every term
  has a closed form: L_{t-1} = 0 (fixed_small) or KL(N(m, bt) || N(m, b)) (fixed_large), and
  L_0 = -log of the discretised N(c, beta_tilde_2) at c."""
  tables = _tables()
  x0 = jnp.array([-1.0, 1.0, 100 * 2 / 255 - 1, 7 * 2 / 255 - 1])[:, None, None, None]
  x0 = jnp.broadcast_to(x0, (4, 2, 2, 1))
  model_fn = lambda x_t, t: diffusion.eps_from_x0(tables, x_t, t, x0)
  fn = variant(lambda x0, rng: losses.vlb_bpd(model_fn, tables, x0, rng, model_output="eps",
                                              model_var=model_var))
  out = fn(x0, jax.random.key(7))

  betas = schedules.get_beta_schedule("linear", T)
  abar = np.cumprod(1 - betas)
  bt = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
  c = np.asarray(x0[:, 0, 0, 0], np.float64)
  prior = 0.5 * (abar[-1] * c**2 - abar[-1] - np.log(1 - abar[-1])) / LOG2
  terms = 0.0 if model_var == "fixed_small" else (
      0.5 * (np.log(betas[1:] / bt) + bt / betas[1:] - 1)).sum() / LOG2
  half_bin = 1 / (255 * np.sqrt(bt[0]))
  edge = np.abs(c) == 1
  decoder = -np.where(edge, stats.norm.logcdf(half_bin),
                      np.log(2 * stats.norm.cdf(half_bin) - 1)) / LOG2
  np.testing.assert_allclose(out["prior"], prior, rtol=1e-3)
  np.testing.assert_allclose(out["terms"], np.broadcast_to(terms, (4,)), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(out["decoder"], decoder, rtol=1e-4)
  np.testing.assert_allclose(out["total"], out["prior"] + out["terms"] + out["decoder"], rtol=1e-6)


@pytest.mark.parametrize("model_var", ["fixed_large", "learned_range"])
def test_vlb_bpd_components_of_a_poor_model(model_var):
  tables = _tables()
  x0, _ = _batch(8)
  model_fn, params = _two_part_model()
  fn = functools.partial(model_fn, params)
  if model_var == "fixed_large":
    fn = lambda x_t, t: 0.5 * x_t
  out = jax.jit(lambda x0, rng: losses.vlb_bpd(fn, tables, x0, rng, model_output="eps",
                                               model_var=model_var))(x0, jax.random.key(9))
  assert set(out) == {"prior", "terms", "decoder", "total"}
  for key, value in out.items():
    assert value.shape == (SHAPE[0],), key
    assert bool(jnp.all(jnp.isfinite(value))) and bool(jnp.all(value >= 0)), key
  np.testing.assert_allclose(out["total"], out["prior"] + out["terms"] + out["decoder"], rtol=1e-6)
  # The same rng gives the same bound; another rng draws other noise.
  again = jax.jit(lambda x0, rng: losses.vlb_bpd(fn, tables, x0, rng, model_output="eps",
                                                 model_var=model_var))(x0, jax.random.key(9))
  np.testing.assert_array_equal(again["total"], out["total"])


# --- Importance sampling of t ----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_uniform_sampling(variant):
  t, w = variant(lambda rng: losses.sample_timesteps(rng, 4000, T, "uniform"))(jax.random.key(0))
  assert t.dtype == jnp.int32 and t.shape == (4000,) and w.dtype == jnp.float32
  assert int(t.min()) == 0 and int(t.max()) == T - 1
  np.testing.assert_array_equal(w, 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_importance_warm_up_is_uniform(variant):
  state = losses.init_importance_state(8)
  assert state.history.shape == (8, 10) and state.history.dtype == jnp.float32
  assert state.counts.shape == (8,) and state.counts.dtype == jnp.int32
  # Every t but one has a full (and very uneven) history: still warming up.
  state = state.replace(history=state.history.at[:7].set(jnp.arange(7.0)[:, None] + 1),
                        counts=state.counts.at[:7].set(10))
  sample = variant(lambda rng, s: losses.sample_timesteps(rng, 4000, 8, "importance", s))
  t, w = sample(jax.random.key(1), state)
  np.testing.assert_array_equal(w, 1.0)
  np.testing.assert_allclose(losses.importance_probs(state), 1 / 8)
  counts = np.bincount(np.asarray(t), minlength=8)
  # Binomial(4000, 1/8): sd ~ 21.
  np.testing.assert_array_less(np.abs(counts - 500), 5 * np.sqrt(4000 / 8 * 7 / 8))


@pytest.mark.parametrize("variant", VARIANTS)
def test_importance_after_warm_up(variant):
  num_t = 6
  rng = np.random.default_rng(0)
  history = rng.uniform(0.0, 1.0, (num_t, 10)) * np.arange(1, num_t + 1)[:, None] ** 2
  state = losses.ImportanceState(history=jnp.asarray(history, jnp.float32),
                                 counts=jnp.full((num_t,), 10, jnp.int32))
  rms = np.sqrt((history**2).mean(1))
  p = 0.999 * rms / rms.sum() + 0.001 / num_t
  np.testing.assert_allclose(variant(losses.importance_probs)(state), p, rtol=1e-5)

  t, w = variant(lambda rng, s: losses.sample_timesteps(rng, 20000, num_t, "importance", s))(
      jax.random.key(2), state)
  got_p = np.asarray(losses.importance_probs(state), np.float64)
  np.testing.assert_allclose(w, 1 / (num_t * got_p[np.asarray(t)]), rtol=1e-6)
  freq = np.bincount(np.asarray(t), minlength=num_t) / 20000
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / 20000))
  # Unbiased: E_p[w(t) L_t] = sum_t p(t) L_t / (T p(t)) = the uniform mean of L_t.
  per_t_loss = rng.uniform(0, 5, num_t)
  np.testing.assert_allclose(np.sum(got_p * per_t_loss / (num_t * got_p)), per_t_loss.mean(),
                             rtol=1e-6)


def test_importance_with_all_zero_history_is_uniform():
  state = losses.ImportanceState(history=jnp.zeros((5, 10)), counts=jnp.full((5,), 10, jnp.int32))
  np.testing.assert_allclose(losses.importance_probs(state), 0.2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_keeps_newest_losses_with_repeated_t(variant):
  state = losses.init_importance_state(4, history_len=3)
  update = variant(losses.update_importance_state)
  state = update(state, jnp.array([1, 1, 2, 1, 1, 3]), jnp.array([1.0, 2.0, 5.0, 3.0, 4.0, 6.0]))
  np.testing.assert_array_equal(state.counts, [0, 3, 1, 1])
  np.testing.assert_array_equal(state.history, [[0, 0, 0], [2, 3, 4], [5, 0, 0], [6, 0, 0]])
  state = update(state, jnp.array([2, 2, 2, 0]), jnp.array([7.0, 8.0, 9.0, 10.0]))
  np.testing.assert_array_equal(state.counts, [1, 3, 3, 1])
  np.testing.assert_array_equal(state.history, [[10, 0, 0], [2, 3, 4], [7, 8, 9], [6, 0, 0]])
  # Once every t is full, sampling leaves the warm-up.
  state = update(state, jnp.array([0, 0, 3, 3]), jnp.ones(4))
  probs = np.asarray(losses.importance_probs(state))
  assert not np.allclose(probs, 0.25) and np.isclose(probs.sum(), 1.0)
