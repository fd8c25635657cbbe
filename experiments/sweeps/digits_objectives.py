"""The training objectives at the quickstart's budget: DDPM eps, DDPM v, EDM and flow matching.

Two stages. `--grid=train` (the default) trains the four digits models, each with the digits
config's own budget (2,500 steps, batch 64, EMA 0.995) and every checkpoint kept:

  python -m experiments.sweep --sweep=digits_objectives

Then one sample-only sweep per objective scores its EMA model with three samplers, DPM-Solver++
(2M), DPM-Solver++ (2M SDE) and Heun on EDM's sigma grid, at 10, 20 and 50 model calls each
(`--mode=eval`, digits score, 500 samples as the quickstart draws):

  for o in eps v edm flow; do python -m experiments.sweep --sweep=digits_objectives --grid=$o; done
  python -m experiments.objectives   # digits_objectives_best.*: best sampler per NFE

Heun makes 2N - 1 calls on N points, fewer where a step starts above sigma 80 (Euler there:
`sampling.nfe`); each point takes the most grid points within its budget.
"""

import functools

OBJECTIVES = {
    "eps": {"diffusion.parameterization": "ddpm", "diffusion.model_output": "eps"},
    "v": {"diffusion.parameterization": "ddpm", "diffusion.model_output": "v"},
    "edm": {"diffusion.parameterization": "edm"},
    "flow": {"diffusion.parameterization": "flow"},
}
NFES = (10, 20, 50)
SAMPLERS = {"dpm_solver_pp": "default", "dpm_solver_pp_sde": "default", "heun": "karras"}
ROOT = "runs/sweeps/digits_objectives"

TRAIN_FIXED = {
    "training.keep_checkpoints": 10,   # earlier checkpoints guide autoguidance
    "training.sample_every": 2500,
    "training.final_eval_metrics": (),
}
EVAL_FIXED = {
    "eval.metrics": ("digits_score",),
    "sampling.num_samples": 500,
}


@functools.cache
def _tables(objective: str):
  from configs import digits  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.update_from_flattened_dict(OBJECTIVES[objective])
  return factories.tables_from_config(config)


def grid_points(objective: str, sampler: str, grid: str, nfe: int) -> int:
  """The most grid points whose model calls (`sampling.nfe` on the objective's tables) are at
  most `nfe`."""
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  n = nfe
  while sampling.nfe(sampler, n, _tables(objective), grid) > nfe:
    n -= 1
  return n


def get_sweep(grid: str = "train") -> dict:
  """'train': the four models; 'eps' | 'v' | 'edm' | 'flow': that model's sampler x NFE points."""
  if grid == "train":
    points = [{"name": name, **overrides} for name, overrides in OBJECTIVES.items()]
    return dict(name="digits_objectives", config="configs/digits.py", fixed=TRAIN_FIXED,
                points=points)
  if grid not in OBJECTIVES:
    raise ValueError(f"Unknown grid {grid!r} for digits_objectives; valid: "
                     f"{['train', *OBJECTIVES]}.")
  points = [{"name": f"{sampler}-nfe{nfe}", "sampling.sampler": sampler, "sampling.grid": g,
             "sampling.num_steps": grid_points(grid, sampler, g, nfe)}
            for nfe in NFES for sampler, g in SAMPLERS.items()]
  return dict(name=f"digits_objectives_{grid}", config="configs/digits.py",
              fixed={**OBJECTIVES[grid], **EVAL_FIXED}, points=points,
              checkpoint=f"{ROOT}/{grid}",
              plot={"x": "sampler_nfe", "y": "digits_frechet_distance", "series": "sampler",
                    "floor": ["digits_frechet_distance_floor"], "logx": True,
                    "title": f"{grid}: digits FD of 500 samples vs model calls"})
