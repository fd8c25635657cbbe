"""Quality against model calls for every sampler, on one trained digits checkpoint (no training).

Each sampler runs at NFE in {5, 10, 20, 50, 100} on its authors' default grid, plus ancestral
sampling with all 1000 steps, each point as `--mode=eval` (digits score only) on the quickstart's
checkpoint:

  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits   # once, if needed
  python -m experiments.sweep --sweep=digits_samplers [--checkpoint=runs/digits]

NFE is honest: Heun and EDM's stochastic sampler take N grid points for 2N - 2 model calls on
the digits config's linear schedule (2N - 1 but for the first step, which starts above EDM's
sigma_max = 80 and is Euler, and so are any others above it; `sampling.nfe`), so each point takes
the most grid points within its budget and the table reports the calls actually made
(`sampler_nfe`: 4, 10, 20, 50, 99). The committed results were made before that rule, with
N = (NFE + 1) // 2 and 2N - 1 calls (5, 9, 19, 49, 99).
Every point scores 500 samples, the quickstart's number, so the samples are drawn exactly as the
quickstart draws them.
"""

import functools

NFES = (5, 10, 20, 50, 100)
# Every name of `ddpm_jax.sampling.SAMPLERS` but ancestral, which (with a fixed variance) always
# takes all T steps; tests/sweep_test.py checks that none is missing.
FEW_STEP_SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "edm_stochastic",
                     "dpm_solver_pp", "dpm_solver_pp_sde", "dpm_solver_pp_3m")
# Second-order samplers that make 2N - 2 model calls on N grid points here (see above).
_TWO_CALLS_PER_STEP = ("heun", "edm_stochastic")
# EDM's stochastic sampler with the churn of its ImageNet-64 setting (Karras et al. 2022,
# Table 5); with s_churn = 0 it would be Heun exactly.
_EDM_CHURN = {"sampling.s_churn": 40.0, "sampling.s_tmin": 0.05, "sampling.s_tmax": 50.0,
              "sampling.s_noise": 1.003}

FIXED = {
    "eval.metrics": ("digits_score",),
    "sampling.num_samples": 500,
    "sampling.grid": "default",
}


@functools.cache
def _digits_tables():
  from configs import digits  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import factories  # pylint: disable=g-import-not-at-top
  return factories.tables_from_config(digits.get_config())


def grid_points(sampler: str, nfe: int) -> int:
  """The most grid points N whose model calls (`sampling.nfe` on the digits config's schedule and
  the sampler's default grid) are at most `nfe`: N for most samplers; for Heun and EDM one more
  call per step that starts at or below sigma 80."""
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  if sampler not in _TWO_CALLS_PER_STEP:
    return nfe
  tables = _digits_tables()
  n = nfe
  while sampling.nfe(sampler, n, tables) > nfe:
    n -= 1
  return n


def get_sweep(grid: str = "default") -> dict:
  """The sweep definition (fields of `experiments.points.Sweep`).

  Args:
    grid: 'default' (every sampler at every NFE) or 'quick' (NFE 10 and 50 only).

  Returns:
    The sweep as a dict.
  """
  nfes = {"default": NFES, "quick": (10, 50)}
  if grid not in nfes:
    raise ValueError(f"Unknown grid {grid!r} for digits_samplers; valid: {list(nfes)}.")
  points = [{"name": f"{s}-nfe{n}", "sampling.sampler": s,
             "sampling.num_steps": grid_points(s, n),
             **(_EDM_CHURN if s == "edm_stochastic" else {})}
            for n in nfes[grid] for s in FEW_STEP_SAMPLERS]  # cheapest first
  points.append({"name": "ancestral-nfe1000", "sampling.sampler": "ancestral",
                 "sampling.num_steps": 1000})
  return dict(name="digits_samplers", config="configs/digits.py", fixed=FIXED, points=points,
              checkpoint="runs/digits",
              plot={"x": "sampler_nfe", "y": "digits_frechet_distance", "series": "sampler",
                    "floor": ["digits_frechet_distance_floor",
                              "digits_frechet_distance_train_real"], "logx": True,
                    "title": "Digits FD of 500 samples vs model calls (lower is better)"})
