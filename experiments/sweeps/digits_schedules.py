"""The CIFAR-10 schedule ablation's axes on the embedded 8x8 digits, affordable on a 2-core CPU.

The default grid is the schedule axis at T=1000 with L_simple (6 points, about 3-4 minutes each
on 2 CPU cores); --grid=full is all 24 points of `cifar10_schedules.GRID`. Point names always
carry every axis, so the default points are exactly the full grid's T=1000/mse points and share
their workdirs: a full sweep after the default one reruns nothing.

  python -m experiments.sweep --sweep=digits_schedules
  python -m experiments.sweep --sweep=digits_schedules --grid=full
"""

from experiments.sweeps import cifar10_schedules

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
}

GRIDS = {
    "default": {**cifar10_schedules.GRID,
                "diffusion.num_timesteps": [1000],
                "diffusion.loss": ["mse"]},
    "full": cifar10_schedules.GRID,
}


def get_sweep(grid: str = "default") -> dict:
  """The sweep definition (fields of `experiments.sweep.Sweep`).

  Args:
    grid: 'default' (6 schedules at T=1000, mse) or 'full' (24 points).

  Returns:
    The sweep as a dict.
  """
  if grid not in GRIDS:
    raise ValueError(f"Unknown grid {grid!r} for digits_schedules; valid: {list(GRIDS)}.")
  return dict(name="digits_schedules", config="configs/digits.py", fixed=FIXED,
              grid=GRIDS[grid])
