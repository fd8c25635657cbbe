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
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.core import diffusion
from ddpm_jax.core import schedules

MU = np.array([0.3, -0.2])
SIGMA = np.array([[0.2, 0.1], [0.1, 0.15]])  # Eigenvalues 0.28 and 0.07.
EIGVALS, EIGVECS = np.linalg.eigh(SIGMA)
DIM = 2
NUM_SAMPLES = 8192


@functools.lru_cache(maxsize=None)
def _tables(name="cosine", num_timesteps=100, zero_terminal_snr=False):
  return schedules.make_tables(
      schedules.get_beta_schedule(name, num_timesteps, zero_terminal_snr))


def _abar_at(tables, t):
  """abar at fractional t: 1 / (1 + sigma^2), log sigma interpolated (see `sampling.grids`)."""
  ls = sampling.grids.log_sigmas(tables)
  abar_last = float(np.asarray(tables.abar)[-1])
  finite = np.isfinite(ls)
  idx = jnp.asarray(np.arange(ls.size)[finite], jnp.float32)
  log_sig = jnp.interp(t, idx, jnp.asarray(ls[finite], jnp.float32))
  abar = jax.nn.sigmoid(-2.0 * log_sig)  # 1 / (1 + sigma^2), exact at sigma -> 0.
  return jnp.where(t >= ls.size - 1, abar_last, abar)


def _oracle(tables, model_output="eps", learned_var=False):
  """The exact E[eps|x_t], E[x_0|x_t] or v of the Gaussian data, as a batched model_fn."""
  mu, u, lam = (jnp.asarray(a, jnp.float32) for a in (MU, EIGVECS, EIGVALS))

  def model_fn(x, t):
    abar = _abar_at(tables, t)[:, None]
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
    scale = diffusion.gather(tables.sqrt_one_minus_abar, jnp.round(t).astype(jnp.int32), x.ndim)
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


# --- Grids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", list(sampling.GRIDS))
@pytest.mark.parametrize("num_timesteps, num_steps",
                         [(1000, 1), (1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000),
                          (100, 20), (100, 99), (7, 7)])
def test_grid_properties(grid, num_timesteps, num_steps):
  tables = _tables("linear", num_timesteps)
  g = sampling.make_grid(grid, tables, num_steps)
  assert g.shape == (num_steps,) and g[0] == num_timesteps - 1
  assert np.all(np.diff(g) < 0) and g[-1] >= 0
  if grid in ("uniform", "quadratic", "trailing"):
    np.testing.assert_array_equal(g, np.round(g))
  if num_steps > 1 and grid in ("uniform", "quadratic", "logsnr", "karras"):
    np.testing.assert_allclose(g[-1], 0.0, atol=1e-9)
  if num_steps == num_timesteps and grid in ("uniform", "quadratic", "trailing"):
    np.testing.assert_array_equal(g, np.arange(num_timesteps)[::-1])


def test_grid_values():
  grids, t10, t100 = sampling.grids, _tables("linear", 10), _tables()
  t1000 = _tables("linear", 1000)
  np.testing.assert_array_equal(grids.uniform(t10, 4), [9, 6, 3, 0])
  np.testing.assert_array_equal(grids.uniform(t1000, 5), [999, 749, 500, 250, 0])
  np.testing.assert_array_equal(grids.quadratic(t100, 5), [99, 55, 24, 6, 0])  # floor(99 (i/4)^2)
  np.testing.assert_array_equal(grids.quadratic(t1000, 500)[-4:], [3, 2, 1, 0])
  np.testing.assert_array_equal(grids.trailing(t1000, 4), [999, 749, 499, 249])  # Lin et al. T2.
  # Karras: sigma^(1/7) is linear in i; log-SNR grid: log sigma is linear in i; both ladders
  # start at EDM's sigma_max = 80 (below the linear schedule's 157), whose point is replaced by
  # index T - 1 itself.
  top = grids.sigma_at(t1000, np.array(999.0))
  assert grids.SIGMA_MAX == 80.0 and top > 150
  sig = grids.sigma_at(t1000, grids.karras(t1000, 10))
  assert sig[0] == top
  np.testing.assert_allclose(np.diff(np.append(80.0, sig[1:]) ** (1 / 7), 2), 0.0, atol=1e-6)
  sig = grids.sigma_at(t1000, grids.logsnr(t1000, 10))
  assert sig[0] == top
  np.testing.assert_allclose(np.diff(np.log(np.append(80.0, sig[1:])), 2), 0.0, atol=1e-6)
  # Interpolation in log sigma reproduces the table at integer t.
  ls = grids.log_sigmas(t1000)
  np.testing.assert_allclose(np.log(grids.sigma_at(t1000, np.arange(1000.0))), ls, rtol=1e-12)
  np.testing.assert_allclose(grids.t_at(t1000, np.exp(ls)), np.arange(1000.0), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="unipc"), "ancestral.*ddim.*euler.*heun.*dpm_solver_pp"),
    (dict(name="ddim", grid="linear"), "default.*uniform.*quadratic.*trailing.*logsnr.*karras"),
    (dict(name="ancestral", grid="karras"), "integer grid"),
    (dict(name="ddim", model_output="score"), "eps.*x0.*v"),
    (dict(name="ddim", model_var="large"), "fixed_small.*fixed_large.*learned.*learned_range"),
    (dict(name="ddim", num_steps=0), "num_steps"),
    (dict(name="dpm_solver_pp", num_steps=101), "num_steps"),
    (dict(name="ddim", eta=-0.5), "eta"),
    (dict(name="dpm_solver_pp", eta=1.0), "eta"),
    (dict(name="ancestral", trajectory_every=-1), "trajectory_every"),
    (dict(name="heun", s_churn=1.0), "edm_stochastic"),
    (dict(name="edm_stochastic", s_churn=-1.0), "s_churn >= 0"),
    (dict(name="edm_stochastic", s_tmin=2.0, s_tmax=1.0), "s_tmin <= s_tmax"),
    (dict(name="edm_stochastic", s_noise=0.0), "s_noise > 0"),
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
    ("dpm_solver_pp", dict(num_steps=20, grid="quadratic"), 0.004),
    ("dpm_solver_pp", dict(num_steps=20, grid="uniform"), 0.03),
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
                   grid="quadratic", clip_x0=False)
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
  ddim, _ = _sample("ddim", tables, model_fn, shape, eta=1.0)  # Its levels come from float64.
  np.testing.assert_allclose(ddim, ancestral, atol=1e-4)


# --- Determinism, sharding, trajectory ---------------------------------------------------------

# Every sampler, with a few steps (ancestral: respaced, since the toy model is fixed_large too).
_OPTIONS = {"ddim": dict(eta=0.5), "edm_stochastic": dict(s_churn=4.0, s_tmin=0.1, s_noise=1.007)}
EVERY_SAMPLER = [(name, dict(num_steps=5, **_OPTIONS.get(name, {}))) for name in sampling.SAMPLERS
                 ] + [("ancestral", {})]


@pytest.mark.parametrize("name, kwargs", EVERY_SAMPLER)
def test_same_seed_same_samples(name, kwargs):
  tables = _tables("linear", 20)
  sample_fn = sampling.get_sampler(name, tables, **kwargs)
  run = jax.jit(lambda key: sample_fn(_toy_model(tables, "fixed_large"), key, (4, 2, 2, 1))[0])
  a, b, c = (np.asarray(run(jax.random.key(seed))) for seed in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.all(a != c)


# XLA:CPU contracts c * x + y into a fused multiply-add in some vectorised loops and not in
# others, so one HLO compiled for 2 and for 8 examples per device can differ by 1 ulp (seen for
# euler and dpm_solver_pp: identical HLO, differences gone with FMA off). That is the compiler,
# not the sampler, so the bitwise check runs in a child process with FMA-free codegen (AVX).
_NO_FMA = "--xla_cpu_max_isa=AVX"


def test_sharded_batch_gives_the_same_samples_without_fma():
  """Runs the bitwise check below, for every sampler, where the compiler emits no FMA."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {_NO_FMA}")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                         __file__,
                         "-k", "test_sharded_batch_gives_the_same_samples["], env=env,
                        capture_output=True, text=True, check=False)
  output = proc.stdout[-3000:] + proc.stderr[-2000:]
  assert proc.returncode == 0 and " passed" in proc.stdout, output
  assert "skipped" not in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("name, kwargs", EVERY_SAMPLER)
def test_sharded_batch_gives_the_same_samples(name, kwargs):
  """The batch sharded over 4 devices gives the samples of one device: noise is global."""
  if _NO_FMA not in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("run by test_sharded_batch_gives_the_same_samples_without_fma")
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
    ("dpm_solver_pp", dict(num_steps=10, grid="quadratic"))])
def test_trajectory(name, kwargs):
  # 19 (ancestral) or 10 model calls, recorded every 3: at steps 0, 3, ..., the last one.
  tables, shape, every = _tables("linear", 19), (4, 1, 1, DIM), 3
  num_records = 7 if name == "ancestral" else 4
  model_fn = _oracle(tables, "v")
  x, traj = _sample(name, tables, model_fn, shape, model_output="v", trajectory_every=every,
                    **kwargs)
  assert traj["x_t"].shape == traj["pred_x0"].shape == (num_records,) + shape
  assert traj["t"].shape == (num_records,) and traj["t"].dtype == jnp.float32
  assert np.all(np.diff(traj["t"]) < 0) and traj["t"][-1] == 0 and traj["t"][0] == 18
  if name == "ancestral":
    np.testing.assert_array_equal(traj["t"], np.arange(18, -1, -3))
  # The first record is the initial noise, drawn from the sampler's key with the full shape.
  np.testing.assert_array_equal(traj["x_t"][0], jax.random.normal(jax.random.key(0), shape))
  # Each pred_x0 is the clipped x0 prediction of the model at the recorded (x_t, t).
  x_t = traj["x_t"].reshape((-1,) + shape[1:])
  t = jnp.repeat(traj["t"], shape[0]).astype(jnp.int32)
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
      assert t.shape == shape[:1] and t.dtype == jnp.float32  # Contract 2.
      return toy(x, t)
    return model_fn

  runs = [(sampling.get_sampler(name, tables, model_output=out, model_var=var,
                                num_steps=None if name == "ancestral" else 4), counted((out, var)))
          for out, var in combos]
  for combo, (x, _) in zip(combos, _sample_many(runs, shape)):
    assert x.shape == shape and x.dtype == jnp.float32, combo
    assert np.all(np.isfinite(x)), combo
    # One trace of the model per call site: the loop is a single fori_loop (Heun has two).
    assert calls[combo] == (2 if name in ("heun", "edm_stochastic") else 1), combo


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_zero_terminal_snr_gives_finite_samples(name):
  """jsd and zero-terminal-SNR schedules (abar_T = 0, log-SNR -inf) give finite samples."""
  kwargs = {} if name == "ancestral" else dict(num_steps=10)
  runs = []  # The sigma samplers' default Karras grid starts at sigma = inf here.
  for tables in (_tables("jsd", 50), _tables("linear", 50, zero_terminal_snr=True)):
    assert float(tables.abar[-1]) == 0.0 and np.isneginf(tables.log_snr[-1])
    for model_fn, clip_x0 in [(_oracle(tables), False), (_toy_model(tables, "fixed_large"), True)]:
      runs.append((sampling.get_sampler(name, tables, clip_x0=clip_x0, trajectory_every=1,
                                        **kwargs), model_fn))
  for x, traj in _sample_many(runs, (16, 1, 1, DIM)):
    assert np.all(np.isfinite(x))
    assert np.all(np.isfinite(traj["x_t"])) and np.all(np.isfinite(traj["pred_x0"]))


# --- Contract 2: x_start / t_start / post_step; respacing; NFE -------------------------------


@pytest.mark.parametrize("name, kwargs", EVERY_SAMPLER)
def test_post_step_identity_and_full_start_change_nothing(name, kwargs):
  """post_step = identity is bitwise a no-op; x_start = the noise at t_start = T-1 is the run."""
  tables, shape = _tables("linear", 20), (4, 2, 2, 1)
  sample_fn = sampling.get_sampler(name, tables, trajectory_every=1, **kwargs)
  model_fn = _toy_model(tables, "fixed_large")
  key = jax.random.key(2)
  noise = jax.random.normal(key, shape)
  seen = []

  def post_step(i, x, t_next, k):
    seen.append(t_next.dtype)
    return x

  plain, with_post, started = jax.jit(lambda k: [
      sample_fn(model_fn, k, shape),
      sample_fn(model_fn, k, shape, post_step=post_step),
      sample_fn(model_fn, k, shape, x_start=noise, t_start=19)])(key)
  jax.tree.map(np.testing.assert_array_equal, plain, with_post)
  jax.tree.map(np.testing.assert_array_equal, plain, started)
  assert seen == [jnp.float32]


def test_t_start_truncates_the_grid_and_post_step_sees_every_step():
  tables, shape = _tables("linear", 100), (2, 1, 1, DIM)
  sample_fn = sampling.get_sampler("ddim", tables, num_steps=11, trajectory_every=1)
  ts = []
  post = lambda i, x, t, k: (jax.debug.callback(lambda v: ts.append(float(v)), t), x)[1]
  x0 = jnp.full(shape, 0.3)
  x, traj = sample_fn(_oracle(tables), jax.random.key(0), shape, x_start=x0, t_start=45.5,
                      post_step=post)
  jax.effects_barrier()
  np.testing.assert_allclose(traj["t"], [45.5, 40, 30, 20, 10, 0])
  np.testing.assert_array_equal(traj["x_t"][0], x0)
  assert ts == [40.0, 30.0, 20.0, 10.0, 0.0, -1.0]
  with pytest.raises(ValueError, match="x_start and t_start"):
    sample_fn(_oracle(tables), jax.random.key(0), shape, t_start=10)


@pytest.mark.parametrize("model_var", ["learned", "learned_range", "fixed_small"])
def test_respaced_ancestral_at_k_equal_t_is_the_full_sampler(model_var):
  """Improved DDPM respacing with K = T is bitwise the full ancestral sampler."""
  tables, shape = _tables("linear", 30), (4, 2, 2, 1)
  model_fn = _toy_model(tables, model_var)
  full, _ = _sample("ancestral", tables, model_fn, shape, model_var=model_var)
  same, _ = _sample("ancestral", tables, model_fn, shape, model_var=model_var, num_steps=30)
  np.testing.assert_array_equal(full, same)
  rt = sampling.vp.respaced_tables(tables, sampling.make_grid("uniform", tables, 10))
  abar = np.asarray(tables.abar, np.float64)[sampling.make_grid("uniform", tables, 10)[::-1]
                                              .astype(int)]
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(rt.betas, np.float64)), abar, rtol=1e-5)
  short, _ = _sample("ancestral", tables, model_fn, shape, model_var=model_var, num_steps=10)
  assert np.all(np.isfinite(short))


def count_model_calls(name: str, num_steps: int, schedule: str = "linear", num_timesteps: int = 50,
                      **kwargs) -> int:
  """How many times sampler `name` calls the model on a `num_steps` grid (default linear, T=50)."""
  tables, shape = _tables(schedule, num_timesteps), (2, 1, 1, DIM)
  calls = []
  oracle = _oracle(tables)

  def model_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return oracle(x, t)

  sampling.get_sampler(name, tables, num_steps=num_steps, **kwargs)(
      model_fn, jax.random.key(0), shape)
  jax.effects_barrier()
  return len(calls)


def test_heun_counts_2n_minus_1_model_calls():
  assert count_model_calls("heun", 6) == sampling.nfe("heun", 6) == 11


@pytest.mark.parametrize("name", ["heun", "edm_stochastic"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("grid", ["quadratic", "karras", "logsnr"])
def test_nfe_counts_the_euler_steps_from_above_sigma_max(name, schedule, grid):
  """T = 1000: sigma at T - 1 is 157 (linear) or about 20,000 (cosine), above EDM's 80, so the
  first step is Euler and Heun makes 2N - 2 calls; `nfe` with the tables says so."""
  tables = _tables(schedule, 1000)
  calls = count_model_calls(name, 6, schedule, 1000, grid=grid)
  assert calls == sampling.nfe(name, 6, tables, grid) == 10
  assert sampling.nfe(name, 6) == 11  # the upper bound, without the tables

