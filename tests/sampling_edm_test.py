"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2) and its config keys, on the Gaussian data
and oracle of sampling_test.py (whose docstring gives the closed forms)."""

import jax
import numpy as np
import pytest
from sampling_test import DIM
from sampling_test import MU
from sampling_test import NUM_SAMPLES
from sampling_test import SIGMA
from sampling_test import _oracle
from sampling_test import _sample_many
from sampling_test import _tables
from sampling_test import count_model_calls

from ddpm_jax import sampling


def test_edm_stochastic_without_churn_is_heun_and_with_it_samples_the_data():
  """S_churn = 0 is bitwise Heun (EDM Alg. 2 reduces to Alg. 1); with churn it visits
  sigma_hat = sigma (1 + gamma) and still has the Gaussian data's moments."""
  tables, shape = _tables(), (NUM_SAMPLES, 1, 1, DIM)
  kw = dict(num_steps=18, clip_x0=False, trajectory_every=1)
  churn = dict(s_churn=10.0, s_tmin=0.05, s_tmax=20.0, s_noise=1.0)
  runs = [(sampling.get_sampler(name, tables, **kw, **opts), _oracle(tables))
          for name, opts in [("heun", {}), ("edm_stochastic", {}), ("edm_stochastic", churn)]]
  (heun, heun_traj), (edm0, edm0_traj), (edm, edm_traj) = _sample_many(runs, shape)
  jax.tree.map(np.testing.assert_array_equal, (heun, heun_traj), (edm0, edm0_traj))
  grid = sampling.make_grid("quadratic", tables, 18)
  sig = sampling.grids.sigma_at(tables, grid)
  sig_hat = sampling.grids.sigma_at(tables, np.asarray(edm_traj["t"], np.float64))
  gamma = np.where((sig >= 0.05) & (sig <= 20.0), min(10.0 / 18, np.sqrt(2) - 1), 0.0)
  gamma[0] = 0.0
  np.testing.assert_allclose(sig_hat, sig * (1 + gamma), rtol=1e-4)
  assert np.sum(gamma > 0) >= 5
  x = np.asarray(edm, np.float64).reshape(NUM_SAMPLES, DIM)
  mean_tol = 4 * np.sqrt(np.diag(SIGMA) / NUM_SAMPLES) + 0.002
  cov_tol = 4 * np.sqrt((np.outer(np.diag(SIGMA), np.diag(SIGMA)) + SIGMA**2) / NUM_SAMPLES)
  np.testing.assert_array_less(np.abs(x.mean(0) - MU), mean_tol)
  np.testing.assert_array_less(np.abs(np.cov(x, rowvar=False) - SIGMA), cov_tol + 0.01)
  assert np.any(np.asarray(edm) != np.asarray(heun))


def test_edm_stochastic_counts_2n_minus_1_model_calls_with_churn():
  assert (count_model_calls("edm_stochastic", 6, s_churn=5.0)
          == sampling.nfe("edm_stochastic", 6) == 11)


@pytest.mark.parametrize("key, value, match", [
    ("s_churn", -1.0, "s_churn >= 0"), ("s_tmin", 5.0, "s_tmin <= s_tmax"),
    ("s_noise", 0.0, "s_noise > 0")])
def test_config_edm_options_are_checked_before_compiling(key, value, match):
  from configs import base
  from ddpm_jax.config import validation
  config = base.get_config()
  config.sampling.sampler, config.sampling.s_tmax = "edm_stochastic", 1.0
  validation.validate(config, mode="sample")
  config.sampling[key] = value
  with pytest.raises(ValueError, match=match):
    validation.validate(config, mode="sample")


def test_sampler_from_config_passes_the_edm_options():
  """sampler_from_config with sampling.s_* is get_sampler with them (s_tmax = -1 is inf)."""
  from configs import base
  from ddpm_jax.config import factories
  config = base.get_config()
  config.diffusion.num_timesteps, config.diffusion.clip_x0 = 50, False
  config.sampling.update(sampler="edm_stochastic", num_steps=6, s_churn=5.0, s_noise=1.01)
  tables, shape = _tables("linear", 50), (4, 1, 1, DIM)
  ours = factories.sampler_from_config(config, tables)
  theirs = sampling.get_sampler("edm_stochastic", tables, num_steps=6, s_churn=5.0,
                                s_noise=1.01, clip_x0=False,
                                model_output=config.diffusion.model_output,
                                model_var=config.diffusion.model_var)
  a, b = _sample_many([(ours, _oracle(tables)), (theirs, _oracle(tables))], shape)
  np.testing.assert_array_equal(a[0], b[0])
