"""Noise schedules beta_1..beta_T and the tables derived from them.

Everything is computed once in float64 NumPy and only then cast to the compute dtype, so
that the cumulative products (and their differences near 1) keep their precision.

Indexing convention used throughout ddpm_jax: the array index `t = 0..T-1` is the
paper's timestep `t = 1..T`. So `betas[0]` is beta_1, `abar[t]` is alpha-bar_{t+1}, and
`abar_prev[0] = 1` is alpha-bar_0.
"""

from collections.abc import Callable
import math

import flax.struct
import jax.numpy as jnp
import numpy as np

# Betas are capped below 1 for the abar-defined schedules (Improved DDPM, sec. 3.2): a beta
# of exactly 1 near t = T makes the last steps singular.
MAX_BETA = 0.999


def _linear(t: int) -> np.ndarray:
  return np.linspace(1e-4, 0.02, t, dtype=np.float64)


def _quad(t: int) -> np.ndarray:
  return np.linspace(1e-4**0.5, 0.02**0.5, t, dtype=np.float64) ** 2


def _warmup(frac: float) -> Callable[[int], np.ndarray]:
  def schedule(t: int) -> np.ndarray:
    betas = np.full(t, 0.02, dtype=np.float64)
    n = int(t * frac)
    betas[:n] = np.linspace(1e-4, 0.02, n, dtype=np.float64)
    return betas
  return schedule


def _const(t: int) -> np.ndarray:
  return np.full(t, 0.02, dtype=np.float64)


def _jsd(t: int) -> np.ndarray:
  # 1/T, 1/(T-1), ..., 1: Sohl-Dickstein et al. 2015. The last beta is 1 (abar_T = 0).
  return 1.0 / np.linspace(t, 1, t, dtype=np.float64)


def _betas_from_abar(abar_fn: Callable[[np.ndarray], np.ndarray], t: int) -> np.ndarray:
  """beta_i = min(1 - abar(i/T) / abar((i-1)/T), MAX_BETA), i = 1..T."""
  s = np.arange(t + 1, dtype=np.float64) / t
  abar = abar_fn(s)
  return np.minimum(1.0 - abar[1:] / abar[:-1], MAX_BETA)


def _cosine(t: int, s: float = 0.008) -> np.ndarray:
  # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) pi/2).
  f = lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return _betas_from_abar(lambda u: f(u) / f(0.0), t)


def _sigmoid(t: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> np.ndarray:
  # Jabri et al. 2022 (RIN), "sigmoid_schedule": abar falls along a shifted, rescaled sigmoid.
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  v_start, v_end = sig(start / tau), sig(end / tau)
  abar = lambda u: (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
  return _betas_from_abar(abar, t)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": _linear,
    "quad": _quad,
    "warmup10": _warmup(0.1),
    "warmup50": _warmup(0.5),
    "const": _const,
    "jsd": _jsd,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Alg. 1: shift and scale sqrt(abar) so that sqrt(abar_T) = 0.

  sqrt(abar_1) is kept, so the first step is unchanged, and the last beta becomes 1.
  """
  sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


def get_beta_schedule(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> np.ndarray:
  """Returns beta_1..beta_T as a float64 array of shape [T].

  Args:
    name: one of `SCHEDULES` (linear/quad/warmup/const: Ho et al. 2020 and its TF code; jsd:
      Sohl-Dickstein et al. 2015; cosine: Nichol & Dhariwal 2021, eq. 17; sigmoid: Jabri et al.
      2022).
    num_timesteps: T.
    zero_terminal_snr: rescale the schedule so that SNR(T) = 0 (Lin et al. 2023).
  """
  if name not in SCHEDULES:
    raise ValueError(f"Unknown beta schedule {name!r}; valid names: {sorted(SCHEDULES)}.")
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}.")
  betas = SCHEDULES[name](num_timesteps)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  assert betas.shape == (num_timesteps,) and betas.dtype == np.float64
  return betas



@flax.struct.dataclass
class DiffusionTables:
  """Per-timestep constants of the forward process and the posterior (DDPM eqs. 4, 6, 7).

  Every field is an array of shape [T] in the compute dtype. The tables form a frozen pytree,
  so they can be closed over, passed through jit, or replicated like any other array.
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  abar: jnp.ndarray                      # prod_{s<=t} alpha_s
  abar_prev: jnp.ndarray                 # abar_{t-1}, with abar_0 = 1
  sqrt_abar: jnp.ndarray
  sqrt_one_minus_abar: jnp.ndarray
  log_one_minus_abar: jnp.ndarray
  snr: jnp.ndarray                       # abar / (1 - abar)
  log_snr: jnp.ndarray
  posterior_variance: jnp.ndarray        # beta_tilde = beta (1 - abar_prev) / (1 - abar)
  posterior_log_variance_clipped: jnp.ndarray  # log beta_tilde, entry 0 replaced by entry 1
  posterior_mean_coef1: jnp.ndarray      # multiplies x_0
  posterior_mean_coef2: jnp.ndarray      # multiplies x_t
  fixed_large_variance: jnp.ndarray      # beta, entry 0 replaced by beta_tilde[1] (DDPM CIFAR-10)
  fixed_large_log_variance: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_tables(betas: np.ndarray, dtype=jnp.float32) -> DiffusionTables:
  """Builds every derived table in float64 NumPy, then casts each to `dtype`."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("betas must be a 1-D array with entries in (0, 1].")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  one_minus_abar = 1.0 - abar
  post_var = betas * (1.0 - abar_prev) / one_minus_abar
  post_log_var = np.log(np.append(post_var[1], post_var[1:]))
  large_var = np.append(post_var[1], betas[1:])
  with np.errstate(divide="ignore"):  # abar_T = 0 gives SNR 0 and log-SNR -inf, on purpose.
    log_snr = np.log(abar) - np.log(one_minus_abar)
  tables = dict(
      betas=betas,
      alphas=alphas,
      abar=abar,
      abar_prev=abar_prev,
      sqrt_abar=np.sqrt(abar),
      sqrt_one_minus_abar=np.sqrt(one_minus_abar),
      log_one_minus_abar=np.log(one_minus_abar),
      snr=abar / one_minus_abar,
      log_snr=log_snr,
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / one_minus_abar,
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / one_minus_abar,
      fixed_large_variance=large_var,
      fixed_large_log_variance=np.log(large_var),
  )
  return DiffusionTables(**{k: jnp.asarray(v, dtype=dtype) for k, v in tables.items()})
