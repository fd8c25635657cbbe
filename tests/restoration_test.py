"""Zero-shot solvers on Gaussian data, where the posterior p(x0 | y) is closed form.

Data x0 ~ N(mu, SD^2 I) per pixel (mu random), whose exact eps under the VP process is
eps(x_t) = (x_t - alpha E[x0 | x_t]) / s with E[x0 | x_t] = mu + alpha SD^2 (x_t - alpha mu) /
(alpha^2 SD^2 + s^2). A fixed x_true is measured, y = A x_true + sigma_y n, and B posterior samples
are drawn for that one y. The posterior is

  N(mu + SD^2 A^T (SD^2 A A^T + sigma_y^2 I)^-1 (y - A mu),
    SD^2 I - SD^4 A^T (SD^2 A A^T + sigma_y^2 I)^-1 A).

For this prior both solvers (with sigma_data = SD) give the exact E[x0 | x_t, y], so every sampler
draws from the exact posterior up to its discretisation. (restoration_samplers_test.py runs
every sampler on every schedule against the same posterior, in a file of its own so that the
two test workers share the work.) Tolerances: the sample mean within 5
standard errors of the posterior mean per pixel (the samplers' steps are affine in x here, so
they move the mean exactly), and the sample covariance C^ within 1.5 times its expected sampling
error plus DISC_TOL of the closed form C, in relative Frobenius norm: E||C^ - C||^2 =
(tr(C)^2 + ||C||^2) / B for Gaussian samples, and DISC_TOL bounds the sampler's discretisation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.core import degradations
from ddpm_jax.core import denoisers
from ddpm_jax.core import noise_levels
from ddpm_jax.core import schedules
from ddpm_jax.sampling import editing
from ddpm_jax.sampling import restoration

SD = 0.5
B = 16384
DISC_TOL = 0.03
SHAPES = {"sr2": (8, 1), "sr4": (8, 1), "blur_gauss": (8, 1), "blur_uniform": (8, 1),
          "colourise": (4, 3), "inpaint": (8, 1), "denoise": (4, 1)}


@functools.cache
def _tables(schedule):
  if schedule == "edm":  # the ladder an EDM or flow-matching network is sampled on
    return denoisers.tables_from_sigmas(denoisers.edm_sigmas(1000))
  return schedules.make_tables(schedules.get_beta_schedule(schedule, 1000))


def _op(task):
  size, c = SHAPES[task]
  mask = editing.make_mask("random_half", size, size) if task == "inpaint" else None
  return degradations.make(task, size, c, mask), (size, size, c)


def _prior_eps(tables, mu):
  """The exact eps model of N(mu, SD^2 I)."""
  def model_fn(x, t):
    alpha, s = noise_levels.vp_at(tables, t)
    alpha, s = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (alpha, s))
    ex0 = mu + alpha * SD**2 * (x - alpha * mu) / (alpha**2 * SD**2 + s**2)
    return (x - alpha * ex0) / s
  return model_fn


def _dense(fn, in_shape):
  d = int(np.prod(in_shape))
  basis = jnp.eye(d, dtype=jnp.float32).reshape((d,) + in_shape)
  return np.asarray(jax.jit(fn)(basis), np.float64).reshape(d, -1).T


def _posterior(a, mu, y, sigma_y):
  g = SD**2 * a @ a.T + sigma_y**2 * np.eye(a.shape[0])
  k = SD**2 * a.T @ np.linalg.pinv(g, rcond=1e-10)  # sigma_y = 0: the range of A only
  return mu + k @ (y - a @ mu), SD**2 * np.eye(a.shape[1]) - SD**2 * k @ a


def _setup(task, method, sigma_y, sampler, schedule, num_steps, batch):
  """The measurement of a fixed x_true and a sampling run of the solver's model, not yet run."""
  op, shape = _op(task)
  rng = np.random.default_rng(0)
  mu = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
  x_true = (mu + SD * rng.standard_normal(shape)).astype(np.float32)
  y1 = restoration.measure(op, jnp.asarray(x_true)[None], sigma_y, jax.random.key(7))
  y = jnp.broadcast_to(y1, (batch,) + y1.shape[1:])
  tables = _tables(schedule)
  fn = sampling.get_sampler(sampler, tables, model_output="x0", clip_x0=False,
                            num_steps=None if sampler == "ancestral" else num_steps)
  model = restoration.x0_model(_prior_eps(tables, jnp.asarray(mu)), tables, op, y,
                               method=method, sigma_y=sigma_y, model_output="eps",
                               clip_x0=False, sigma_data=SD)
  return (lambda k: fn(model, k, (batch,) + shape)[0]), op, shape, mu, y1


@functools.cache
def _run_cases(cases, sampler="dpm_solver_pp", num_steps=50, batch=B):
  """{(task, method, sigma_y, schedule): (samples, mean, cov)} of B posterior samples each.

  The cases run as independent loops under one jit: one compilation (2.8 s for six cases of DDIM
  on a 2-core Xeon) rather than one per case (1.6 s each).
  """
  runs = [_setup(task, method, sigma_y, sampler, schedule, num_steps, batch)
          for task, method, sigma_y, schedule in cases]
  xs = jax.jit(lambda k: [run(k) for run, *_ in runs])(jax.random.key(1))
  out = {}
  for case, (_, op, shape, mu, y1), x in zip(cases, runs, xs, strict=True):
    mean, cov = _posterior(_dense(op.A, shape), mu.ravel().astype(np.float64),
                           np.asarray(y1, np.float64).ravel(), case[2])
    out[case] = np.asarray(x, np.float64).reshape(batch, -1), mean, cov
  return out


def _check(samples, mean, cov):
  b = samples.shape[0]
  err = np.abs(samples.mean(0) - mean)
  se = np.sqrt(np.maximum(np.diag(cov), 0) / b)
  assert np.all(err <= 5 * se + 1e-4), (err.max(), (err / (se + 1e-12)).max())
  norm = np.linalg.norm(cov)
  if norm < 1e-12:  # noiseless denoising: the posterior is the measurement itself
    assert np.abs(samples - mean).max() < 1e-5
    return err.max(), 0.0
  rel = np.linalg.norm(np.cov(samples.T) - cov) / norm
  sampling_error = np.sqrt((np.trace(cov)**2 + norm**2) / b) / norm
  assert rel < 1.5 * sampling_error + DISC_TOL, (rel, sampling_error)
  return err.max(), rel


# Its samplers run far longer than they compile (16,384 images per posterior); the DDNM checks
# below (64 images) are the other way round and keep the suite's unoptimised compiles.
@pytest.mark.usefixtures("optimized_xla")
@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
@pytest.mark.parametrize("method", restoration.METHODS)
@pytest.mark.parametrize("task", degradations.TASKS)
def test_every_task_samples_the_gaussian_posterior(task, method, sigma_y):
  cases = tuple((task, m, s, "cosine") for m in restoration.METHODS for s in (0.0, 0.1))
  _check(*_run_cases(cases)[task, method, sigma_y, "cosine"])


@functools.cache
def _ddnm_residuals(sampler, cases):
  """{(task, schedule): max over 64 samples of ||A x - y|| / ||y||} for noiseless DDNM.

  The runs of one sampler are independent loops under one jit: a compilation per sampler rather
  than per case (these 64-image runs take far less time than their compiles).
  """
  runs = [_setup(task, "ddnm", 0.0, sampler, schedule, num_steps=20, batch=64)
          for task, schedule in cases]
  xs = jax.jit(lambda k: [run(k) for run, *_ in runs])(jax.random.key(1))
  out = {}
  for case, (_, op, _, _, y1), x in zip(cases, runs, xs):
    resid = np.linalg.norm(np.asarray(op.A(x) - y1).reshape(64, -1), axis=1)
    out[case] = resid.max() / np.linalg.norm(np.asarray(y1))
  return out


def _check_noiseless_ddnm(task, sampler, schedule, cases):
  assert _ddnm_residuals(sampler, tuple(cases))[task, schedule] <= 1e-5


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
@pytest.mark.parametrize("task", degradations.TASKS)
def test_noiseless_ddnm_meets_the_measurement_to_float_precision(task, sampler):
  _check_noiseless_ddnm(task, sampler, "linear", [(t, "linear") for t in degradations.TASKS])


OTHER_SCHEDULES = [*sorted(set(schedules.SCHEDULES) - {"linear"}), "edm"]


@pytest.mark.parametrize("schedule", OTHER_SCHEDULES)
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_noiseless_ddnm_meets_the_measurement_on_every_schedule(sampler, schedule):
  if sampler == "ancestral" and schedule == "edm":
    pytest.skip("EDM's ladder is for the sigma-space samplers and DDIM.")
  schedules_ = [s for s in OTHER_SCHEDULES if not (sampler == "ancestral" and s == "edm")]
  _check_noiseless_ddnm("sr2", sampler, schedule, [("sr2", s) for s in schedules_])


def test_negative_sigma_y_and_unknown_method_fail_before_tracing():
  op = degradations.make("sr2", 8, 1)
  with pytest.raises(ValueError, match=">= 0"):
    restoration.x0_model(None, None, op, jnp.zeros((1, 4, 4, 1)), method="ddnm", sigma_y=-0.1)
  with pytest.raises(ValueError, match="valid choices"):
    restoration.x0_model(None, None, op, jnp.zeros((1, 4, 4, 1)), method="dps", sigma_y=0.0)
