"""Samplers of p(x_0) as pure jittable functions; `get_sampler` is the one dispatch by name.

| sampler             | order | stochastic | default grid | typical NFE | paper                   |
|---------------------|-------|------------|--------------|-------------|-------------------------|
| ancestral           | 1     | yes        | uniform      | T (or K)    | Ho 2020; Nichol 2021 s4 |
| ddim                | 1     | eta > 0    | uniform      | 50-100      | Song et al. 2021        |
| euler               | 1     | no         | karras       | 50          | Karras et al. 2022      |
| euler_ancestral     | 1     | yes        | karras       | 50          | k-diffusion             |
| heun                | 2     | no         | karras       | 35 (N=18)   | Karras 2022, Alg. 1     |
| dpm_solver_pp       | 2     | no         | logsnr       | 10-25       | Lu et al. 2022, Alg. 2  |
| dpm_solver_pp_sde   | 2     | yes        | logsnr       | 20-50       | Lu et al. 2022          |

Defaults follow the authors: DDPM/DDIM use uniform index spacing, EDM its rho = 7 sigma grid,
DPM-Solver uniform log-SNR ("logSNR", their advice at low resolution). Every sampler takes any
grid of `grids.GRIDS`; none builds its own. See `grids` for fractional timesteps.

The network enters as `model_fn(x_t, t) -> model_out` with t a float32 [B] array of (possibly
fractional) indices in [0, T-1] and model_out the raw output (C channels, or 2C for learned
variances). Every sampler is a single `lax.fori_loop`.
"""

import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.sampling import _loop, dpm_solver, grids, sigma, vp
from ddpm_jax.sampling.grids import GRIDS, make_grid

# name -> (factory(tables, model_output, model_var, clip_x0, **options), default grid).
_SAMPLERS = {
    "ancestral": (vp.ancestral, "uniform"),
    "ddim": (vp.ddim, "uniform"),
    "euler": (sigma.euler, "karras"),
    "euler_ancestral": (sigma.euler_ancestral, "karras"),
    "heun": (sigma.heun, "karras"),
    "dpm_solver_pp": (dpm_solver.dpm_solver_pp, "logsnr"),
    "dpm_solver_pp_sde": (lambda *a: dpm_solver.dpm_solver_pp(*a, sde=True), "logsnr"),
}
SAMPLERS = tuple(_SAMPLERS)
DEFAULT_GRIDS = {name: grid for name, (_, grid) in _SAMPLERS.items()}


def nfe(name: str, num_steps: int) -> int:
  """Model calls of `name` on a grid of `num_steps` points (Heun: 2N - 1, its last step Euler)."""
  return 2 * num_steps - 1 if name == "heun" else num_steps


def get_sampler(name: str, tables, *, model_output: str = "eps", model_var: str = "fixed_large",
                num_steps: int | None = None, eta: float = 0.0, grid: str = "default",
                clip_x0: bool = True, trajectory_every: int = 0):
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
  if trajectory_every < 0:
    raise ValueError(f"trajectory_every must be >= 0, got {trajectory_every}.")
  factory, default = _SAMPLERS[name]
  grid = default if grid == "default" else grid
  if name == "ancestral" and grid not in ("uniform", "quadratic", "trailing"):
    raise ValueError(f"The ancestral sampler needs an integer grid (uniform, quadratic or "
                     f"trailing), got {grid!r}.")
  if name == "ancestral" and model_var in diffusion.LEARNED_VARS:
    pass  # Respaced (Improved DDPM sec. 4): any K.
  args = (tables, model_output, model_var, bool(clip_x0))
  make = factory(*args, eta=float(eta)) if name == "ddim" else factory(*args)
  g = make_grid(grid, tables, num_steps)
  return _loop.run(make, g, int(trajectory_every), tables)


__all__ = ["GRIDS", "SAMPLERS", "DEFAULT_GRIDS", "get_sampler", "make_grid", "nfe", "grids"]
