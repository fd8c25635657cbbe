"""Samplers of p(x_0) as pure jittable functions; `get_sampler` is the one dispatch by name.

| sampler           | order | stochastic | default grid | typical NFE | paper                   |
|-------------------|-------|------------|--------------|-------------|-------------------------|
| ancestral         | 1     | yes        | uniform      | T (or K)    | Ho 2020; Nichol 2021 s4 |
| ddim              | 1     | eta > 0    | uniform      | 50-100      | Song et al. 2021        |
| euler             | 1     | no         | karras       | 50          | Karras et al. 2022      |
| euler_ancestral   | 1     | yes        | karras       | 50          | k-diffusion             |
| heun              | 2     | no         | quadratic    | 25-35       | Karras 2022, Alg. 1     |
| edm_stochastic    | 2     | s_churn>0  | quadratic    | 35+         | Karras 2022, Alg. 2     |
| dpm_solver_pp     | 2     | no         | logsnr       | 10-25       | Lu et al. 2022, Alg. 2  |
| dpm_solver_pp_sde | 2     | yes        | logsnr       | 20-50       | Lu et al. 2022          |
| dpm_solver_pp_3m  | 3     | no         | logsnr       | 15-25       | Lu et al. 2022 (3M)     |

Defaults follow the authors: DDPM/DDIM use uniform index spacing, Euler EDM's rho = 7 sigma
grid, DPM-Solver uniform log-SNR ("logSNR", their advice at low resolution). Heun and EDM's
stochastic sampler are the exception and take the quadratic grid (DDIM paper, sec. D.2): rho = 7
crosses the noise levels where a multi-modal denoiser switches modes in large sigma ratios, over
which the trapezoid rule is far less accurate than the first-order step (which is exact for a
constant denoiser). docs/samplers.md has the exact-score measurements behind this choice
(`benchmarks/exact_score_samplers.py`). The implementation follows EDM Alg. 1 (its order is
checked in `tests/sampling_exact_score_test.py`). Pass grid="karras" for EDM's grid. Every
sampler takes any grid of `grids.GRIDS`; none builds its own. See `grids` for fractional t.

The network enters as `model_fn(x_t, t) -> model_out` with t a float32 [B] array of (possibly
fractional) indices in [0, T-1] and model_out the raw output (C channels, or 2C for learned
variances). Every sampler is a single `lax.fori_loop`.
"""

import numpy as np

from ddpm_jax.core import diffusion
from ddpm_jax.sampling import dpm_solver
from ddpm_jax.sampling import grids
from ddpm_jax.sampling import loop
from ddpm_jax.sampling import sigma
from ddpm_jax.sampling import vp
from ddpm_jax.sampling.grids import GRIDS
from ddpm_jax.sampling.grids import make_grid

# name -> (factory(tables, model_output, model_var, clip_x0, **options), default grid).
_SAMPLERS = {
    "ancestral": (vp.ancestral, "uniform"),
    "ddim": (vp.ddim, "uniform"),
    "euler": (sigma.euler, "karras"),
    "euler_ancestral": (sigma.euler_ancestral, "karras"),
    "heun": (sigma.heun, "quadratic"),
    "dpm_solver_pp": (dpm_solver.dpm_solver_pp, "logsnr"),
    "dpm_solver_pp_sde": (lambda *a: dpm_solver.dpm_solver_pp(*a, sde=True), "logsnr"),
    "dpm_solver_pp_3m": (dpm_solver.dpm_solver_pp_3m, "logsnr"),
    "edm_stochastic": (sigma.heun, "quadratic"),
}
SAMPLERS = tuple(_SAMPLERS)
DEFAULT_GRIDS = {name: grid for name, (_, grid) in _SAMPLERS.items()}


_HEUN_LIKE = ("heun", "edm_stochastic")
# EDM Algorithm 2's defaults: S_churn = 0 (no churn), S_tmin = 0, S_tmax = inf, S_noise = 1.
EDM_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


def nfe(name: str, num_steps: int, tables=None, grid: str = "default") -> int:
  """Model calls of `name` on a grid of `num_steps` points.

  One per point, plus, for Heun and EDM's sampler, one per second-order step: every step but the
  last (Euler, as in EDM) and those that start above `grids.SIGMA_MAX` (Euler too, see
  `sigma.heun`). Without `tables` that is the upper bound 2N - 1; with them (and the sampler's
  `grid`) the exact count, e.g. 2N - 2 on the linear schedule (sigma at T - 1 = 157). EDM's churn
  can lift a step above SIGMA_MAX only if S_tmax reaches it; the count ignores that.
  """
  if name not in _HEUN_LIKE or num_steps == 1:
    return num_steps
  if tables is None:
    return 2 * num_steps - 1
  g = make_grid(DEFAULT_GRIDS[name] if grid == "default" else grid, tables, num_steps)
  sig = grids.sigma_at(tables, g[:-1])
  return num_steps + int(np.sum(sig <= sigma.SECOND_ORDER_MAX))


def check_edm_options(name: str, s_churn: float, s_tmin: float, s_tmax: float,
                      s_noise: float) -> None:
  """Raises ValueError unless the EDM Algorithm 2 options are valid (and used only by it)."""
  opts = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
  if name != "edm_stochastic" and opts != EDM_DEFAULTS:
    raise ValueError(f"s_churn, s_tmin, s_tmax and s_noise are options of 'edm_stochastic' "
                     f"only; got {opts} for {name!r}.")
  if not (s_churn >= 0 and 0 <= s_tmin <= s_tmax and s_noise > 0):
    raise ValueError(f"EDM's stochastic sampler needs s_churn >= 0, 0 <= s_tmin <= s_tmax and "
                     f"s_noise > 0; got {opts}.")


def get_sampler(name: str, tables, *, model_output: str = "eps", model_var: str = "fixed_large",
                num_steps: int | None = None, eta: float = 0.0, grid: str = "default",
                clip_x0: bool = True, trajectory_every: int = 0, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
  """Returns `sample_fn(model_fn, rng, shape, *, x_start=None, t_start=None, post_step=None)`.

  Every argument is checked here, before anything is traced.

  Args:
    name: one of `SAMPLERS`.
    tables: the schedule's `DiffusionTables`.
    model_output: one of `diffusion.MODEL_OUTPUTS`.
    model_var: one of `diffusion.MODEL_VARS`; only the ancestral sampler uses a learned or fixed
      variance (respaced for K < T, Improved DDPM sec. 4); the others split off its channels.
    num_steps: grid points N, 1 <= N <= T (None: T). Model calls are `nfe(name, N)`.
    eta: DDIM's noise scale; must be 0 for the others.
    grid: one of `GRIDS`, or "default" for the sampler's own (`DEFAULT_GRIDS`).
    clip_x0: clip the x0 prediction to [-1, 1] at every step (eps_hat follows it).
    trajectory_every: if positive, also record the state every that many steps.
    s_churn, s_tmin, s_tmax, s_noise: EDM Algorithm 2's options, 'edm_stochastic' only (sigma
      units, Karras et al. 2022 Table 5); with s_churn = 0 it is bitwise 'heun'.

  Returns:
    sample_fn(model_fn, rng, shape, *, x_start, t_start, post_step) -> (x0, trajectory):
    `shape` is the global batch shape; x_start/t_start start from x_start at index t_start (the
    grid truncated to points < t_start); `post_step(i, x_next, t_next, key)` runs after every
    step (t_next = -1 after the last). trajectory is None or a dict of K recordings, the last
    at the final grid point: 'x_t' [K, *shape], 'pred_x0' [K, *shape], 't' [K] float32.
  """
  diffusion.check_choice("sampler", name, SAMPLERS)
  diffusion.check_choice("sampling grid", grid, ("default",) + tuple(GRIDS))
  diffusion.check_choice("model_output", model_output, diffusion.MODEL_OUTPUTS)
  diffusion.check_choice("model_var", model_var, diffusion.MODEL_VARS)
  num_timesteps = tables.num_timesteps
  num_steps = num_timesteps if num_steps is None else int(num_steps)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule length), "
                     f"got {num_steps}.")
  if eta < 0 or (name != "ddim" and eta != 0):
    raise ValueError(f"eta must be >= 0, and only 'ddim' uses it; got eta={eta} for {name!r}.")
  check_edm_options(name, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
  if trajectory_every < 0:
    raise ValueError(f"trajectory_every must be >= 0, got {trajectory_every}.")
  factory, default = _SAMPLERS[name]
  grid = default if grid == "default" else grid
  if name == "ancestral" and grid not in ("uniform", "quadratic", "trailing"):
    raise ValueError(f"The ancestral sampler needs an integer grid (uniform, quadratic or "
                     f"trailing), got {grid!r}.")
  args = (tables, model_output, model_var, bool(clip_x0))
  if name == "ddim":
    make = factory(*args, eta=float(eta))
  elif name == "edm_stochastic":
    make = factory(*args, churn=(float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)))
  else:
    make = factory(*args)
  g = make_grid(grid, tables, num_steps)
  return loop.run(make, g, int(trajectory_every), tables)


__all__ = ["GRIDS", "SAMPLERS", "DEFAULT_GRIDS", "EDM_DEFAULTS", "check_edm_options", "get_sampler",
           "make_grid", "nfe", "grids"]
