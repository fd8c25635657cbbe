"""Quality against model calls for every sampler, on one trained digits checkpoint (no training).

Each sampler runs at NFE in {5, 10, 20, 50, 100} on its authors' default grid, plus ancestral
sampling with all 1000 steps, each point as `--mode=eval` (digits score only) on the quickstart's
checkpoint:

  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits   # once, if needed
  python -m experiments.sweep --sweep=digits_samplers [--checkpoint=runs/digits]

NFE is honest: Heun and EDM's stochastic sampler take N grid points for 2N - 1 model calls
(`sampling.nfe`), so its points use N = (NFE + 1) // 2 and the table reports the calls actually
made (`sampler_nfe`, 5, 9, 19, 49, 99).
Every point scores 500 samples, the quickstart's number, so the samples are drawn exactly as the
quickstart draws them.
"""

NFES = (5, 10, 20, 50, 100)
# Every name of `ddpm_jax.sampling.SAMPLERS` but ancestral, which (with a fixed variance) always
# takes all T steps; tests/sweep_test.py checks that none is missing.
FEW_STEP_SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "edm_stochastic",
                     "dpm_solver_pp", "dpm_solver_pp_sde", "dpm_solver_pp_3m")
# Second-order samplers that make 2N - 1 model calls on N grid points.
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


def grid_points(sampler: str, nfe: int) -> int:
  """Grid points N that make at most `nfe` model calls (Heun, EDM: 2N - 1, the others N)."""
  return (nfe + 1) // 2 if sampler in _TWO_CALLS_PER_STEP else nfe


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
