"""Power-function EMAs and their post-hoc reconstruction (EDM2, Karras et al. 2024)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import posthoc_ema


def test_gamma_and_sigma_rel_are_inverse_and_match_edm2():
  # EDM2 (sec. 3): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
  assert posthoc_ema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
  assert posthoc_ema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
  for s in (0.01, 0.05, 0.07, 0.1, 0.2, 0.28):
    assert posthoc_ema.sigma_rel_from_gamma(posthoc_ema.gamma_from_sigma_rel(s)) == \
        pytest.approx(s, rel=1e-9)
  with pytest.raises(ValueError, match="sigma_rel"):
    posthoc_ema.gamma_from_sigma_rel(0.3)


def test_power_ema_weights_are_the_continuous_profile_integrated_over_each_step():
  """The recursive update gives theta_tau the weight (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), the
  integral of p(.; t, g) over (tau - 1, tau]: the profile the reconstruction works with."""
  rng = np.random.default_rng(0)
  thetas = rng.standard_normal((50, 3))
  gamma = 6.94
  ema = thetas[0]
  for t in range(1, 51):
    ema = posthoc_ema.update(ema, thetas[t - 1], t, gamma)
  tau = np.arange(1, 51, dtype=np.float64)
  w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 50.0 ** (gamma + 1)
  np.testing.assert_allclose(ema, (w[:, None] * thetas).sum(0), rtol=1e-10)


def _trajectory(steps=4000, dim=256, seed=0):
  """A drifting, noisy parameter trajectory: the regime where the EMA width matters."""
  rng = np.random.default_rng(seed)
  drift = np.cumsum(rng.standard_normal((steps, dim)), axis=0) / np.sqrt(steps)
  return drift + 0.3 * rng.standard_normal((steps, dim))


def _track(thetas, gammas, every):
  """Each gamma's EMA tracked over the trajectory; snapshots (step, gamma, ema) every `every`."""
  emas = [np.zeros_like(thetas[0]) for _ in gammas]
  snaps = []
  for t in range(1, len(thetas) + 1):
    emas = [posthoc_ema.update(e, thetas[t - 1], t, g) for e, g in zip(emas, gammas)]
    if t % every == 0:
      snaps += [(t, g, e) for g, e in zip(gammas, emas)]
  return emas, snaps


@pytest.mark.parametrize("target_sigma_rel", [0.03, 0.07, 0.15])
def test_reconstruction_equals_the_directly_tracked_ema(target_sigma_rel):
  """Snapshots of sigma_rel 0.05 and 0.10 every 100 of 4000 steps rebuild the EMA of another
  sigma_rel at the last step: its distance to the EMA tracked directly is under 1% of the
  distance between the two tracked EMAs (what choosing between them would change)."""
  thetas = _trajectory()
  gammas = [posthoc_ema.gamma_from_sigma_rel(s) for s in (0.05, 0.10)]
  target_gamma = posthoc_ema.gamma_from_sigma_rel(target_sigma_rel)
  (tracked_a, tracked_b, direct), snaps = _track(thetas, gammas + [target_gamma], 100)
  snaps = [s for s in snaps if s[1] != target_gamma]
  coef = posthoc_ema.solve_coefficients([s[0] for s in snaps], [s[1] for s in snaps],
                                        len(thetas), target_gamma)
  rebuilt = posthoc_ema.reconstruct([s[2] for s in snaps], coef)
  scale = np.linalg.norm(tracked_a - tracked_b)
  assert np.linalg.norm(rebuilt - direct) < 0.01 * scale, np.linalg.norm(rebuilt - direct) / scale
  assert coef.sum() == pytest.approx(1.0, abs=0.01)  # the profiles are normalised


def test_reconstructing_a_tracked_sigma_rel_gives_that_ema():
  thetas = _trajectory(steps=2000)
  gammas = [posthoc_ema.gamma_from_sigma_rel(s) for s in (0.05, 0.10)]
  (_, tracked_b), snaps = _track(thetas, gammas, 100)
  coef = posthoc_ema.solve_coefficients([s[0] for s in snaps], [s[1] for s in snaps], 2000,
                                        gammas[1])
  rebuilt = posthoc_ema.reconstruct([s[2] for s in snaps], coef)
  np.testing.assert_allclose(rebuilt, tracked_b, atol=1e-3 * np.abs(tracked_b).max())


@pytest.mark.parametrize("step", [1e4, 1e6, 3e7])
def test_update_weight_is_float32_accurate_at_long_runs(step):
  """1 - beta_t is about (gamma + 1) / t; in float32, 1 - 1/t rounds by up to 6e-8, a relative
  error of 6e-8 t in that weight (6% at a million steps) unless it is computed via log1p."""
  gamma = posthoc_ema.gamma_from_sigma_rel(0.05)
  out = posthoc_ema.update(jnp.zeros(()), jnp.ones(()), jnp.float32(step), gamma)
  exact = -np.expm1((gamma + 1) * np.log1p(-1 / np.float64(step)))
  np.testing.assert_allclose(float(out), exact, rtol=1e-5)
