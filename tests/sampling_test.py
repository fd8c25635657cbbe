"""Tests of ddpm_jax.sampling against Gaussian data, whose exact denoiser is known in closed form.

For x_0 ~ N(mu, Sigma) and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, x_t ~ N(sqrt(abar) mu, C_t)
with C_t = abar Sigma + (1 - abar) I, and the MMSE predictions are

  E[eps | x_t] = sqrt(1 - abar) C_t^{-1} (x_t - sqrt(abar) mu),
  E[x_0 | x_t] = mu + sqrt(abar) Sigma C_t^{-1} (x_t - sqrt(abar) mu),

(v follows from both). So a sampler run with that oracle as its model must reproduce N(mu, Sigma)
up to its own discretisation error, and a deterministic sampler must follow the probability-flow
ODE, whose solution from x_T is also closed form: in Sigma's eigenbasis (eigenvalues l_k) each
centred coordinate is scaled by sqrt(l_k / (abar_T l_k + 1 - abar_T)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion
from ddpm_jax import sampling
from ddpm_jax import schedules

MU = np.array([0.3, -0.2])
SIGMA = np.array([[0.2, 0.1], [0.1, 0.15]])  # Eigenvalues 0.28 and 0.07.
EIGVALS, EIGVECS = np.linalg.eigh(SIGMA)
DIM = 2
NUM_SAMPLES = 8192


@functools.lru_cache(maxsize=None)
def _tables(name="cosine", num_timesteps=100, zero_terminal_snr=False):
  return schedules.make_tables(
      schedules.get_beta_schedule(name, num_timesteps, zero_terminal_snr))


def _oracle(tables, model_output="eps", learned_var=False):
  """The exact E[eps|x_t], E[x_0|x_t] or v of the Gaussian data, as a batched model_fn."""
  mu, u, lam = (jnp.asarray(a, jnp.float32) for a in (MU, EIGVECS, EIGVALS))

  def model_fn(x, t):
    abar = tables.abar[t][:, None]
    z = (x.reshape(x.shape[0], DIM) - jnp.sqrt(abar) * mu) @ u  # Centred, in the eigenbasis.
    c_inv = 1.0 / (abar * lam + 1.0 - abar)
    eps = (jnp.sqrt(1.0 - abar) * c_inv * z) @ u.T
    x0 = mu + (jnp.sqrt(abar) * lam * c_inv * z) @ u.T
    out = {"eps": eps, "x0": x0, "v": jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0}
    out = out[model_output].reshape(x.shape)
    if learned_var:  # A variance channel that DDIM and DPM-Solver++ must ignore.
      out = jnp.concatenate([out, jnp.full_like(out, 1e3)], axis=-1)
    return out

  return model_fn


def _toy_model(tables, model_var):
  """A cheap nonlinear per-example model with the right channel count for `model_var`."""
  def model_fn(x, t):
    scale = diffusion.gather(tables.sqrt_one_minus_abar, t, x.ndim)
    pred = (jnp.tanh(x) + 0.1) * scale
    if model_var == "learned":
      return jnp.concatenate([pred, -3.0 + 0.1 * x], axis=-1)
    if model_var == "learned_range":
      return jnp.concatenate([pred, jnp.tanh(x)], axis=-1)
    return pred
  return model_fn


def _sample(name, tables, model_fn, shape, seed=0, **kwargs):
  sample_fn = sampling.get_sampler(name, tables, **kwargs)
  return jax.jit(lambda key: sample_fn(model_fn, key, shape))(jax.random.key(seed))


def _sample_many(runs, shape, seed=0):
  """[(sample_fn, model_fn)] -> their (x0, trajectory), all from one jit (compiles 3-4x faster)."""
  return jax.jit(lambda key: [fn(model_fn, key, shape) for fn, model_fn in runs])(
      jax.random.key(seed))


# --- Timestep respacing --------------------------------------------------------------------


@pytest.mark.parametrize("spacing", sampling.SPACINGS)
@pytest.mark.parametrize("num_timesteps, num_steps",
                         [(1000, 1), (1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000),
                          (100, 20), (100, 99), (7, 7)])
def test_respaced_timesteps_properties(spacing, num_timesteps, num_steps):
  steps = sampling.respaced_timesteps(num_timesteps, num_steps, spacing)
  assert steps.shape == (num_steps,) and np.issubdtype(steps.dtype, np.integer)
  assert steps[0] == 0
  assert np.all(np.diff(steps) > 0)
  if num_steps > 1:
    assert steps[-1] == num_timesteps - 1
  if num_steps == num_timesteps:
    np.testing.assert_array_equal(steps, np.arange(num_timesteps))


def test_respaced_timesteps_values():
  np.testing.assert_array_equal(sampling.respaced_timesteps(10, 4, "uniform"), [0, 3, 6, 9])
  np.testing.assert_array_equal(sampling.respaced_timesteps(1000, 5, "uniform"),
                                [0, 250, 500, 749, 999])  # 249.75 -> 250, 749.25 -> 749.
  # floor(99 (i/4)^2) = 0, 6, 24, 55, 99.
  np.testing.assert_array_equal(sampling.respaced_timesteps(100, 5, "quadratic"),
                                [0, 6, 24, 55, 99])
  # The quadratic curve's first gaps are below one index; those steps are pushed apart.
  np.testing.assert_array_equal(sampling.respaced_timesteps(1000, 500, "quadratic")[:4],
                                [0, 1, 2, 3])


@pytest.mark.parametrize("args, match", [
    ((100, 0, "uniform"), "num_steps"),
    ((100, 101, "uniform"), "num_steps"),
    ((100, 10, "cosine"), "uniform.*quadratic"),
])
def test_respaced_timesteps_errors(args, match):
  with pytest.raises(ValueError, match=match):
    sampling.respaced_timesteps(*args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="euler"), "ancestral.*ddim.*dpm_solver_pp"),
    (dict(name="ddim", spacing="linear"), "uniform.*quadratic"),
    (dict(name="ddim", model_output="score"), "eps.*x0.*v"),
    (dict(name="ddim", model_var="large"), "fixed_small.*fixed_large.*learned.*learned_range"),
    (dict(name="ddim", num_steps=0), "num_steps"),
    (dict(name="dpm_solver_pp", num_steps=101), "num_steps"),
    (dict(name="ancestral", num_steps=50), "ancestral.*all 100"),
    (dict(name="ddim", eta=-0.5), "eta"),
    (dict(name="dpm_solver_pp", eta=1.0), "eta"),
    (dict(name="ancestral", trajectory_every=-1), "trajectory_every"),
])
def test_get_sampler_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler(tables=_tables(), **kwargs)


# --- Samples of Gaussian data ----------------------------------------------------------------

# Allowed discretisation bias of each sampler on cosine T = 100, above the Monte Carlo error.
# Measured with 1e5 samples (so to about +-0.002), the bias of the covariance entries is:
#   ancestral fixed_small -0.013 (too small: beta_tilde omits the uncertainty of x0_hat),
#   ancestral fixed_large +0.005, DDIM eta=0 on 50 steps -0.014, DDIM eta=1 on all steps
#   -0.013 (it is ancestral fixed_small), DPM-Solver++ on 20 quadratic steps -0.002 and on 20
#   uniform steps +0.018; the mean's bias is below 0.001 in every case.
# Each bound is 1.5-2x the measured bias (3x for the loose eta = 1 check), for variances of
# 0.15-0.2; the Monte Carlo allowance on top is 4 standard errors.
MOMENT_CASES = [
    ("ancestral", dict(model_var="fixed_small"), 0.02),
    ("ancestral", dict(model_var="fixed_large"), 0.008),
    ("ddim", dict(num_steps=50), 0.02),
    ("ddim", dict(num_steps=50, model_var="learned_range"), 0.02),
    ("dpm_solver_pp", dict(num_steps=20, spacing="quadratic"), 0.004),
    ("dpm_solver_pp", dict(num_steps=20), 0.03),
    ("ddim", dict(eta=1.0), 0.04),  # Loosely, as asked of the stochastic DDIM.
]


@pytest.mark.parametrize("name, kwargs, cov_bias", MOMENT_CASES)
def test_gaussian_data_moments(name, kwargs, cov_bias):
  """Samples with the exact eps, x0 and v oracles have the data's mean and covariance."""
  tables = _tables()
  learned_var = kwargs.get("model_var", "") in diffusion.LEARNED_VARS
  runs = [(sampling.get_sampler(name, tables, model_output=out, clip_x0=False, **kwargs),
           _oracle(tables, out, learned_var)) for out in diffusion.MODEL_OUTPUTS]
  # Four standard errors: sqrt(Sigma_ii / N) for the mean, sqrt((S_ii S_jj + S_ij^2) / N) for
  # the covariance (Gaussian data), plus the sampler's bias.
  mean_tol = 4 * np.sqrt(np.diag(SIGMA) / NUM_SAMPLES) + 0.002
  cov_tol = 4 * np.sqrt((np.outer(np.diag(SIGMA), np.diag(SIGMA)) + SIGMA**2) / NUM_SAMPLES)
  for out, (x, traj) in zip(diffusion.MODEL_OUTPUTS,
                            _sample_many(runs, (NUM_SAMPLES, 1, 1, DIM))):
    assert traj is None and x.dtype == jnp.float32
    x = np.asarray(x, np.float64).reshape(NUM_SAMPLES, DIM)
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), mean_tol, err_msg=out)
    np.testing.assert_array_less(np.abs(np.cov(x, rowvar=False) - SIGMA), cov_tol + cov_bias,
                                 err_msg=out)


def test_ode_samplers_follow_the_exact_flow():
  """DDIM (eta=0) converges to the probability-flow ODE at first order, DPM-Solver++ faster.

  No Monte Carlo error here: each sample is compared with the exact ODE map of its own x_T.
  """
  tables, n = _tables(), 1000
  shape = (n, 1, 1, DIM)
  x_T = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float64).reshape(n, DIM)
  abar_T = float(tables.abar[-1])
  flow = EIGVECS @ np.diag(np.sqrt(EIGVALS / (abar_T * EIGVALS + 1 - abar_T))) @ EIGVECS.T
  exact = MU + (x_T - np.sqrt(abar_T) * MU) @ flow.T

  def rms_error(name, num_steps):
    x, _ = _sample(name, tables, _oracle(tables), shape, num_steps=num_steps,
                   spacing="quadratic", clip_x0=False)
    return np.sqrt(np.mean((np.asarray(x).reshape(n, DIM) - exact) ** 2))

  ddim = {s: rms_error("ddim", s) for s in (20, 100)}
  dpm = {s: rms_error("dpm_solver_pp", s) for s in (20, 100)}
  # Measured: DDIM 0.029 and 0.0076, DPM-Solver++ 0.0010 and 0.00015.
  assert ddim[100] < 0.4 * ddim[20] and ddim[100] < 0.012
  assert dpm[20] < 0.1 * ddim[20] and dpm[20] < 0.002
  assert dpm[100] < 0.05 * ddim[100] and dpm[100] < 0.0003


def test_ddim_eta_one_on_all_steps_is_ancestral_fixed_small():
  """Song et al. 2021: with eta = 1, sigma^2 = beta_tilde and the mean is DDPM's posterior mean.

  Both samplers draw step i's noise from fold_in(rng, i), so the samples agree to float error.
  """
  tables = _tables("linear", 100)
  model_fn = _toy_model(tables, "fixed_small")
  shape = (16, 2, 2, 1)
  ancestral, _ = _sample("ancestral", tables, model_fn, shape, model_var="fixed_small")
  ddim, _ = _sample("ddim", tables, model_fn, shape, eta=1.0)
  np.testing.assert_allclose(ddim, ancestral, atol=1e-4)


# --- Determinism, sharding, trajectory ---------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [("ancestral", {}), ("ddim", dict(eta=0.5, num_steps=5)),
                                          ("dpm_solver_pp", dict(num_steps=5))])
def test_same_seed_same_samples(name, kwargs):
  tables = _tables("linear", 20)
  sample_fn = sampling.get_sampler(name, tables, **kwargs)
  run = jax.jit(lambda key: sample_fn(_toy_model(tables, "fixed_large"), key, (4, 2, 2, 1))[0])
  a, b, c = (np.asarray(run(jax.random.key(seed))) for seed in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.all(a != c)


@pytest.mark.parametrize("name, kwargs", [("ancestral", {}), ("ddim", dict(eta=0.5, num_steps=7)),
                                          ("dpm_solver_pp", dict(num_steps=7))])
def test_sharded_batch_gives_the_same_samples(name, kwargs):
  """The batch sharded over 4 devices gives the samples of one device: noise is global."""
  assert jax.device_count() >= 4, "conftest.py should simulate 4 CPU devices"
  tables, shape = _tables("linear", 20), (8, 2, 2, 1)
  sample_fn = sampling.get_sampler(name, tables, trajectory_every=3, **kwargs)
  model_fn = _toy_model(tables, "fixed_large")
  fn = lambda key: sample_fn(model_fn, key, shape)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  batch = NamedSharding(mesh, P("data"))
  traj_sharding = {"x_t": NamedSharding(mesh, P(None, "data")),
                   "pred_x0": NamedSharding(mesh, P(None, "data")), "t": NamedSharding(mesh, P())}
  sharded = jax.jit(fn, out_shardings=(batch, traj_sharding))(jax.random.key(3))
  single = jax.jit(fn)(jax.random.key(3))
  assert sharded[0].sharding == batch and len(sharded[0].addressable_shards) == 4
  # Bitwise: the per-example math is the same on every shard and the noise is global.
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


@pytest.mark.parametrize("name, kwargs", [
    ("ancestral", {}), ("ddim", dict(num_steps=10, eta=0.3)),
    ("dpm_solver_pp", dict(num_steps=10, spacing="quadratic"))])
def test_trajectory(name, kwargs):
  # 19 (ancestral) or 10 model calls, recorded every 3: at steps 0, 3, ..., the last one.
  tables, shape, every = _tables("linear", 19), (4, 1, 1, DIM), 3
  num_records = 7 if name == "ancestral" else 4
  model_fn = _oracle(tables, "v")
  x, traj = _sample(name, tables, model_fn, shape, model_output="v", trajectory_every=every,
                    **kwargs)
  assert traj["x_t"].shape == traj["pred_x0"].shape == (num_records,) + shape
  assert traj["t"].shape == (num_records,) and traj["t"].dtype == jnp.int32
  assert np.all(np.diff(traj["t"]) < 0) and traj["t"][-1] == 0 and traj["t"][0] == 18
  if name == "ancestral":
    np.testing.assert_array_equal(traj["t"], np.arange(18, -1, -3))
  # The first record is the initial noise, drawn from the sampler's key with the full shape.
  np.testing.assert_array_equal(traj["x_t"][0], jax.random.normal(jax.random.key(0), shape))
  # Each pred_x0 is the clipped x0 prediction of the model at the recorded (x_t, t).
  x_t = traj["x_t"].reshape((-1,) + shape[1:])
  t = jnp.repeat(traj["t"], shape[0])
  expected, _ = diffusion.predict_x0_eps(tables, model_fn(x_t, t), x_t, t, "v", True)
  np.testing.assert_allclose(traj["pred_x0"], expected.reshape(traj["x_t"].shape), atol=1e-5)
  # The last step is at index 0, where every sampler returns its x0 prediction.
  np.testing.assert_allclose(x, traj["pred_x0"][-1], atol=1e-6)


# --- Every configuration compiles; schedules with abar_T = 0 ---------------------------------


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_every_combination_runs_and_traces_the_model_once(name):
  tables, shape = _tables("linear", 8), (2, 2, 2, 3)
  combos = [(out, var) for out in diffusion.MODEL_OUTPUTS for var in diffusion.MODEL_VARS]
  calls = {combo: 0 for combo in combos}

  def counted(combo):
    toy = _toy_model(tables, combo[1])
    def model_fn(x, t):
      calls[combo] += 1
      assert x.shape == shape and x.dtype == jnp.float32
      assert t.shape == shape[:1] and t.dtype == jnp.int32
      return toy(x, t)
    return model_fn

  runs = [(sampling.get_sampler(name, tables, model_output=out, model_var=var,
                                num_steps=None if name == "ancestral" else 4), counted((out, var)))
          for out, var in combos]
  for combo, (x, _) in zip(combos, _sample_many(runs, shape)):
    assert x.shape == shape and x.dtype == jnp.float32, combo
    assert np.all(np.isfinite(x)), combo
    assert calls[combo] == 1, combo  # One trace of the model: the loop is a single fori_loop.


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_zero_terminal_snr_gives_finite_samples(name):
  """jsd and zero-terminal-SNR schedules (abar_T = 0, log-SNR -inf) give finite samples."""
  kwargs = {} if name == "ancestral" else dict(num_steps=10)
  runs = []
  for tables in (_tables("jsd", 50), _tables("linear", 50, zero_terminal_snr=True)):
    assert float(tables.abar[-1]) == 0.0 and np.isneginf(tables.log_snr[-1])
    for model_fn, clip_x0 in [(_oracle(tables), False), (_toy_model(tables, "fixed_large"), True)]:
      runs.append((sampling.get_sampler(name, tables, clip_x0=clip_x0, trajectory_every=1,
                                        **kwargs), model_fn))
  for x, traj in _sample_many(runs, (16, 1, 1, DIM)):
    assert np.all(np.isfinite(x))
    assert np.all(np.isfinite(traj["x_t"])) and np.all(np.isfinite(traj["pred_x0"]))
