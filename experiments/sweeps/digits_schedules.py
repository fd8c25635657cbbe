"""The CIFAR-10 schedule ablation's axes on the embedded 8x8 digits, affordable on a 2-core CPU.

The default grid is the schedule axis at T=1000 with L_simple (6 points, about 3-4 minutes each
on 2 CPU cores); --grid=full is all 24 points of `cifar10_schedules.GRID`. Point names always
carry every axis, so the default points are exactly the full grid's T=1000/mse points and share
their workdirs: a full sweep after the default one reruns nothing.

Each trained point is scored with two samplers, so that the ablation is not the sampler's: its
final evaluation samples with DDIM at 50 steps (with bits/dim), and `--grid=heun-<schedule>`
scores the same checkpoint with Heun on EDM's sigma grid (Karras et al. 2022) at the most grid
points within 50 model calls (a sample-only sweep):

  python -m experiments.sweep --sweep=digits_schedules
  for s in linear quad cosine sigmoid warmup50 jsd; do
    python -m experiments.sweep --sweep=digits_schedules --grid=heun-$s; done
  python -m experiments.schedules          # the two-sampler table and plot
  python -m experiments.sweep --sweep=digits_schedules --grid=full
"""

import functools

from experiments.sweeps import cifar10_schedules

ROOT = "runs/sweeps/digits_schedules"
# The second sampler: Heun on EDM's grid, within this many model calls.
HEUN = {"sampling.sampler": "heun", "sampling.grid": "karras"}
HEUN_NFE = 50

# The same training budget for every schedule.
FIXED = {
    "training.num_train_steps": 1500,
    "training.checkpoint_every": 500,
    "training.sample_every": 1500,
    "training.final_eval_metrics": ("digits_score", "bpd"),
    "eval.bpd_num_examples": 120,
    # bpd stops after the first batch that reaches bpd_num_examples; with the digits default of
    # 360 it would score all 360 test images (T model calls each), three times the cost asked for.
    "eval.batch_size": 120,
    "sampling.num_samples": 500,
    # The first sampler: DDIM at 50 steps, deterministic (Song et al. 2021).
    "sampling.sampler": "ddim",
    "sampling.num_steps": 50,
}

GRIDS = {
    "default": {**cifar10_schedules.GRID,
                "diffusion.num_timesteps": [1000],
                "diffusion.loss": ["mse"]},
    "full": cifar10_schedules.GRID,
}


def point_name(schedule: str) -> str:
  """The default grid's point (and workdir) name of a schedule."""
  return f"schedule-{schedule}__num_timesteps-1000__loss-mse"


@functools.cache
def heun_points(schedule: str) -> int:
  """The most Heun grid points on `schedule` within HEUN_NFE model calls (`sampling.nfe`)."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.diffusion.schedule = schedule
  tables = factories.tables_from_config(config)
  n = HEUN_NFE
  while sampling.nfe("heun", n, tables, HEUN["sampling.grid"]) > HEUN_NFE:
    n -= 1
  return n


def get_sweep(grid: str = "default") -> dict:
  """The sweep definition (fields of `experiments.sweep.Sweep`).

  Args:
    grid: 'default' (6 schedules at T=1000, mse), 'full' (24 points), or 'heun-<schedule>'
      (Heun on the default grid's checkpoint of that schedule, no training).

  Returns:
    The sweep as a dict.
  """
  schedules = GRIDS["default"]["diffusion.schedule"]
  if grid.startswith("heun-") and grid[5:] in schedules:
    schedule = grid[5:]
    return dict(name=f"digits_schedules_heun_{schedule}", config="configs/digits.py",
                fixed={**FIXED, "diffusion.schedule": schedule,
                       "eval.metrics": ("digits_score",), **HEUN},
                points=[{"name": "heun", "sampling.num_steps": heun_points(schedule)}],
                checkpoint=f"{ROOT}/{point_name(schedule)}")
  if grid not in GRIDS:
    raise ValueError(f"Unknown grid {grid!r} for digits_schedules; valid: {list(GRIDS)} or "
                     f"{['heun-' + s for s in schedules]}.")
  return dict(name="digits_schedules", config="configs/digits.py", fixed=FIXED,
              grid=GRIDS[grid])
