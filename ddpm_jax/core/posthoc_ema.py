"""Power-function EMAs and their post-hoc reconstruction (Karras et al. 2024, "Analyzing and
improving the training dynamics of diffusion models" (EDM2), sec. 3 and appendix C).

A power-function EMA of the parameters theta_1, theta_2, ... updates, at step t >= 1,

  ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

so that ema_t averages theta_tau with the weights (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1),
exactly the integral over (tau - 1, tau] of the averaging profile p(tau; t, gamma) = (gamma + 1)
tau^gamma / t^(gamma + 1). Its width relative
to the training length is sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2)
(EDM2 eq. 3). Saving a few such EMAs (e.g. sigma_rel 0.05 and 0.10) every K steps lets one build,
after training, the EMA of any other sigma_rel at any saved step: the least-squares combination
of the snapshots' profiles that best matches the target profile in L2, whose coefficients then
combine the snapshots' parameters. The inner products of two profiles have a closed form, so
this module is pure NumPy / jax maths with no training-loop state.
"""

import jax
import jax.numpy as jnp
import numpy as np


def sigma_rel_from_gamma(gamma):
  """sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))."""
  gamma = np.asarray(gamma, np.float64)
  return np.sqrt(gamma + 1) / ((gamma + 2) * np.sqrt(gamma + 3))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
  """The exponent gamma >= 0 of the power EMA of relative width `sigma_rel`, in (0, 1/sqrt(12)]
  (gamma = 0, a uniform average of all steps so far, is the widest)."""
  widest = float(sigma_rel_from_gamma(0.0))
  if not 0 < sigma_rel <= widest:
    raise ValueError(f"sigma_rel must be in (0, {widest:.4f}] (gamma >= 0), got {sigma_rel}")
  # sigma_rel^2 (g + 2)^2 (g + 3) - (g + 1) = 0: a cubic in g whose largest real root is the one
  # on the decreasing branch gamma >= 0.
  s2 = sigma_rel**2
  roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
  return float(max(0.0, np.max(roots[np.abs(roots.imag) < 1e-9].real)))


def _xp(step):
  """NumPy for host numbers (float64 maths), jax.numpy for arrays inside a step."""
  return np if isinstance(step, (int, float, np.ndarray, np.generic)) else jnp


def _log_beta(step, gamma: float):
  # log1p keeps 1 - 1/t exact in float32 at any step (a rounded 1 - 1/t would give each step's
  # weight a relative error of about 3e-8 t: 3% at a million steps).
  with np.errstate(divide="ignore"):  # t = 1: log 0 = -inf, beta = 0, as it should be
    return (gamma + 1.0) * _xp(step).log1p(-1.0 / step)


def beta(step, gamma: float):
  """beta_t = (1 - 1/t)^(gamma + 1) for the update that includes the params of step t >= 1."""
  return _xp(step).exp(_log_beta(step, gamma))


def update(ema, params, step, gamma: float):
  """ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t (step t >= 1; at t = 1, ema = theta_1)."""
  xp, log_b = _xp(step), _log_beta(step, gamma)
  b, one_minus_b = xp.exp(log_b), -xp.expm1(log_b)
  return jax.tree.map(lambda e, p: b * e + one_minus_b * p, ema, params)


def _log_inner(t_a, g_a, t_b, g_b):
  """log of int_0^min(t_a, t_b) p(tau; t_a, g_a) p(tau; t_b, g_b) dtau, elementwise."""
  m = np.minimum(t_a, t_b)
  return (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m)
          - np.log(g_a + g_b + 1) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))


def solve_coefficients(snapshot_steps, snapshot_gammas, target_step: float,
                       target_gamma: float) -> np.ndarray:
  """Coefficients c (one per snapshot) with sum_i c_i p_i closest in L2 to the target profile.

  Args:
    snapshot_steps: [n] the step t_i at which each snapshot was saved (t_i >= 1).
    snapshot_gammas: [n] the gamma of each snapshot's EMA.
    target_step: the step whose EMA to build (usually the last snapshot's).
    target_gamma: the gamma of the wanted EMA (`gamma_from_sigma_rel`).

  Returns:
    float64 [n]: the reconstruction is sum_i c_i ema_i.
  """
  t = np.asarray(snapshot_steps, np.float64)
  g = np.asarray(snapshot_gammas, np.float64)
  if t.shape != g.shape or t.ndim != 1 or np.any(t < 1):
    raise ValueError("snapshot_steps and snapshot_gammas must be equal-length 1-D, steps >= 1")
  gram = np.exp(_log_inner(t[:, None], g[:, None], t[None, :], g[None, :]))
  rhs = np.exp(_log_inner(t, g, float(target_step), float(target_gamma)))
  # The Gram matrix of nearby snapshots is ill-conditioned; lstsq returns the minimum-norm
  # solution among the (numerically) equivalent ones.
  return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def reconstruct(snapshots, coefficients):
  """sum_i c_i snapshot_i over pytrees of equal structure."""
  coefficients = [float(c) for c in coefficients]
  return jax.tree.map(lambda *leaves: sum(c * leaf for c, leaf in zip(coefficients, leaves)),
                      *snapshots)
