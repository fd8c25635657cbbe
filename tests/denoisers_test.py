"""EDM preconditioning, flow matching and the denoiser bridge to the samplers (core/denoisers)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sampling_exact_score_test as exact

from ddpm_jax import sampling
from ddpm_jax.config import factories
from ddpm_jax.core import denoisers
from ddpm_jax.core import noise_levels

SIGMAS = np.logspace(-3, 2, 41)


def test_edm_scalings_give_unit_variance_input_and_target():
  """Karras et al. 2022, App. B.6: for data of std sigma_data, c_in (x_0 + sigma n) and the
  network's target (x_0 - c_skip (x_0 + sigma n)) / c_out have unit variance, and the loss
  weight is 1 / c_out^2, so lambda c_out^2 = 1 at every sigma."""
  sd = 0.5
  c_skip, c_out, c_in, c_noise = (np.asarray(v, np.float64) for v in
                                  denoisers.edm_scalings(jnp.asarray(SIGMAS), sd))
  np.testing.assert_allclose(c_in**2 * (sd**2 + SIGMAS**2), 1.0, rtol=1e-5)
  target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2
  np.testing.assert_allclose(target_var, 1.0, rtol=1e-5)
  weight = np.asarray(denoisers.edm_loss_weight(jnp.asarray(SIGMAS), sd), np.float64)
  np.testing.assert_allclose(weight * c_out**2, 1.0, rtol=1e-5)
  np.testing.assert_allclose(c_noise, np.log(SIGMAS) / 4, rtol=1e-5, atol=1e-6)


def test_edm_zero_network_is_the_exact_denoiser_of_gaussian_data():
  """For x_0 ~ N(0, sd^2), E[x_0 | x] = sd^2 / (sigma^2 + sd^2) x = c_skip x: the optimal network
  outputs 0, and EDM's weighted loss of that denoiser is lambda c_out^2 = 1 in expectation."""
  sd, n = 0.5, 200_000
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(sd * rng.standard_normal((n, 1)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((n, 1)), jnp.float32)
  for sigma in (0.01, 0.5, 20.0):
    s = jnp.full((n,), sigma, jnp.float32)
    d = denoisers.edm_denoiser(lambda x, c: jnp.zeros_like(x), sd)(x0 + sigma * noise, s)
    np.testing.assert_allclose(d, sd**2 / (sd**2 + sigma**2) * (x0 + sigma * noise), rtol=1e-5)
    loss = denoisers.edm_loss(lambda x, c: jnp.zeros_like(x), x0, s, noise, sd)
    assert abs(float(jnp.mean(loss)) - 1.0) < 0.01


def test_edm_sigma_is_log_normal():
  s = denoisers.edm_sample_sigma(jax.random.key(0), (100_000,))
  log_s = np.log(np.asarray(s, np.float64))
  assert abs(log_s.mean() - denoisers.P_MEAN) < 0.02 and abs(log_s.std() - denoisers.P_STD) < 0.02


def test_flow_matching_path_velocity_and_sigma_correspondence():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.standard_normal((5, 3, 3, 1)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((5, 3, 3, 1)), jnp.float32)
  t = jnp.asarray([0.0, 0.1, 0.5, 0.9, 1.0], jnp.float32)
  x_t = denoisers.flow_interpolate(x0, eps, t)
  np.testing.assert_allclose(x_t[0], x0[0])
  np.testing.assert_allclose(x_t[-1], eps[-1])
  # The target is the time derivative of the path.
  _, dxdt = jax.jvp(lambda tt: denoisers.flow_interpolate(x0, eps, tt), (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(dxdt, denoisers.flow_target(x0, eps), rtol=1e-6, atol=1e-6)
  # x_t / (1 - t) is the VE state x_0 + sigma eps at sigma = t / (1 - t), and back.
  mid = t[1:-1]
  sigma = denoisers.sigma_from_flow_t(mid)
  np.testing.assert_allclose(x_t[1:-1] / (1 - mid)[:, None, None, None],
                             x0[1:-1] + sigma[:, None, None, None] * eps[1:-1], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(denoisers.flow_t_from_sigma(sigma), mid, rtol=1e-6)
  assert float(denoisers.flow_t_from_sigma(jnp.inf)) == 1.0
  # The exact velocity makes the loss 0; the logit-normal t has logit ~ N(0, 1).
  loss = denoisers.flow_matching_loss(lambda x, tt: denoisers.flow_target(x0, eps), x0, t, eps)
  np.testing.assert_array_equal(loss, 0.0)
  u = jax.scipy.special.logit(denoisers.logit_normal_t(jax.random.key(2), (100_000,)))
  assert abs(float(u.mean())) < 0.02 and abs(float(u.std()) - 1) < 0.02


def test_tables_from_sigmas_reproduce_the_ladder():
  sig = denoisers.edm_sigmas(1000)
  assert sig[0] == pytest.approx(denoisers.SIGMA_MIN) and sig[-1] == pytest.approx(80.0)
  tables = denoisers.tables_from_sigmas(sig)
  np.testing.assert_allclose(noise_levels.sigma_at(tables, np.arange(1000.0)), sig, rtol=1e-4)
  with pytest.raises(ValueError, match="increasing"):
    denoisers.tables_from_sigmas(sig[::-1])
  with pytest.raises(ValueError, match="finite"):
    denoisers.tables_from_sigmas(np.append(sig, np.inf))


# --- Every sampler samples each parameterisation: the exact-score data of
# sampling_exact_score_test, whose exact E[x_0 | x_VE] is written three ways. ---

def _exact_x0(x_ve, sigma):
  """E[x_0 | x_0 + sigma n = x_ve] for the per-pixel mixture 1/2 N(+-MU, STD^2)."""
  s = sigma[:, None]
  var = exact.STD**2 + s**2
  w = jax.nn.softmax(jnp.stack([-(x_ve - m) ** 2 / (2 * var) for m in (exact.MU, -exact.MU)]),
                     axis=0)
  return sum(w[k] * (m + exact.STD**2 / var * (x_ve - m))
             for k, m in enumerate((exact.MU, -exact.MU)))


def _edm_net(x_in, time_input):
  """The network whose EDM denoiser is exact: F = (D* - c_skip x) / c_out, fed the U-Net's
  time input 250 c_noise."""
  sigma = jnp.exp(4 * time_input / denoisers.EDM_TIME_SCALE)
  c_skip, c_out, c_in, _ = denoisers.edm_scalings(sigma)
  x = x_in / c_in[:, None]
  return (_exact_x0(x, sigma) - c_skip[:, None] * x) / c_out[:, None]


def _velocity(x_t, time_input):
  """The exact flow-matching velocity: v = (x_t - D*) / t, fed the U-Net's time input 1000 t."""
  t = time_input / denoisers.FLOW_TIME_SCALE
  sigma = denoisers.sigma_from_flow_t(t)
  return (x_t - _exact_x0(x_t / (1 - t)[:, None], sigma)) / t[:, None]


# The tables and model functions a config builds (`factories`): an EDM or flow network is sampled
# on EDM's ladder, T = 1000 levels from 0.002 to 80.
_CONFIGS = {p: ml_collections.ConfigDict({"diffusion": {
    "parameterization": p, "num_timesteps": 1000, "sigma_min": denoisers.SIGMA_MIN,
    "sigma_max": denoisers.SIGMA_MAX, "sigma_data": denoisers.SIGMA_DATA}})
    for p in ("edm", "flow")}
_TABLES = factories.tables_from_config(_CONFIGS["edm"])
# On a ladder that is already EDM's rho = 7 spacing, Heun's quadratic index grid piles its points
# at the lowest noise levels (21.6x the floor at 19 calls); EDM samples these models on its own
# sigma grid, `karras`, which here is exactly EDM's (0.002 to 80, rho = 7).
_GRID = {"ancestral": "uniform", "heun": "karras", "edm_stochastic": "karras"}


def _samples(name, model_fn, model_output):
  steps = exact.num_steps(name, 20)
  kwargs = exact.EDM_CHURN if name == "edm_stochastic" else {}
  fn = sampling.get_sampler(name, _TABLES, num_steps=steps, clip_x0=False,
                            model_output=model_output,
                            grid=_GRID.get(name, "default"), **kwargs)
  x, _ = jax.jit(lambda k: fn(model_fn, k, exact.SHAPE))(jax.random.key(0))
  return np.asarray(x)


def _w1(x):
  return float(np.mean(np.abs(np.sort(x.ravel()) - exact._REF))) / exact._FLOOR


@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_every_sampler_samples_edm_and_flow_models_like_the_exact_eps_model(name):
  """The same exact score as an eps model, an EDM network and a flow-matching velocity: every
  sampler draws the same samples from all three (to float rounding), so the bridge a config
  builds (`factories.sampler_model_fn`: `vp_x0_model` on `tables_from_sigmas`) is exact, and
  they reach the data."""
  samples = {
      "eps": _samples(name, exact._oracle(_TABLES), "eps"),
      "edm": _samples(name, factories.sampler_model_fn(_CONFIGS["edm"], _TABLES, _edm_net),
                      factories.model_output(_CONFIGS["edm"])),
      "flow": _samples(name, factories.sampler_model_fn(_CONFIGS["flow"], _TABLES, _velocity),
                       factories.model_output(_CONFIGS["flow"])),
  }
  # Same key, same path: the same samples up to float32 rounding of the three algebras.
  np.testing.assert_allclose(samples["edm"], samples["eps"], atol=2e-3)
  np.testing.assert_allclose(samples["flow"], samples["eps"], atol=2e-3)
  errors = {k: _w1(v) for k, v in samples.items()}
  # At 20 calls the first-order ancestral sampler and the Heun-like ones on rho = 7 (which crosses
  # this bimodal data's mode switch in large sigma ratios; docs/samplers.md) stay further off.
  assert errors["edm"] < (25.0 if name in ("ancestral", "heun", "edm_stochastic") else 8.0), \
      errors
