"""Autoguidance's scale w on the digits (Karras et al. 2024): the objectives sweep's DDPM eps run
(the quickstart's config and budget, every checkpoint kept) guided by its own EMA at an earlier
checkpoint, sampled as the quickstart samples (DPM-Solver++(2M) SDE, 50 calls, 500 samples).

  python -m experiments.sweep --sweep=digits_objectives --only=eps   # the run, once
  python -m experiments.sweep --sweep=digits_autoguidance [--grid=step1000]

w = 0 is plain sampling (the guide is loaded, and ignored bitwise).
"""

from experiments.sweeps import digits_objectives

RUN = f"{digits_objectives.ROOT}/eps"
SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)
GUIDE_STEPS = {"step500": 500, "step1000": 1000}


def get_sweep(grid: str = "step500") -> dict:
  """grid: the guide's checkpoint, 'step500' (default) or 'step1000' of the 2,500-step run."""
  if grid not in GUIDE_STEPS:
    raise ValueError(f"Unknown grid {grid!r} for digits_autoguidance; valid: {list(GUIDE_STEPS)}.")
  return dict(
      name=f"digits_autoguidance_{grid}", config="configs/digits.py",
      fixed={**digits_objectives.OBJECTIVES["eps"], **digits_objectives.EVAL_FIXED,
             "sampling.guide_workdir": RUN, "sampling.guide_step": GUIDE_STEPS[grid]},
      grid={"sampling.autoguidance_scale": list(SCALES)}, checkpoint=RUN,
      plot={"x": "autoguidance_scale", "y": "digits_frechet_distance",
            "floor": ["digits_frechet_distance_floor"],
            "title": f"Autoguidance by the {grid} EMA: digits FD vs w"})
