"""Noise-schedule ablation for the CIFAR-10 DDPM: 6 schedules x 2 T x 2 losses = 24 runs.

Pod-sized (each point is a full training run of the published 35.7M-parameter model), so it is
launched, not run, from a workstation; point --root at a bucket every worker can write:

  python -m experiments.sweep --sweep=cifar10_schedules --launch=tpu --root=gs://BUCKET/sweeps

Every point gets the same budget (the base config's). The final evaluation computes FID, which
needs converted Inception weights: add 'eval.inception_weights' to `fixed` below (or build the
runs' FID afterwards with --mode=eval).
"""

SCHEDULES = ("linear", "quad", "cosine", "sigmoid", "warmup50", "jsd")

# L_hybrid (Nichol & Dhariwal 2021) only differs from L_simple when the variance is learned,
# so the two overrides travel together under one label.
HYBRID = {"label": "hybrid", "diffusion.loss": "hybrid", "diffusion.model_var": "learned_range"}

# The axes the digits version of this sweep shares.
GRID = {
    "diffusion.schedule": list(SCHEDULES),
    "diffusion.num_timesteps": [1000, 4000],
    "diffusion.loss": ["mse", HYBRID],
}

GRIDS = ("full",)


def get_sweep(grid: str = "full") -> dict:
  """The sweep definition (fields of `experiments.sweep.Sweep`).

  Args:
    grid: only 'full' (all 24 points).

  Returns:
    The sweep as a dict.
  """
  if grid not in GRIDS:
    raise ValueError(f"Unknown grid {grid!r} for cifar10_schedules; valid: {list(GRIDS)}.")
  return dict(
      name="cifar10_schedules",
      config="configs/cifar10.py",
      fixed={"training.final_eval_metrics": ("fid", "bpd")},
      grid=GRID,
  )
