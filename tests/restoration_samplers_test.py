"""Every sampler on every schedule draws the closed-form Gaussian posterior of a restoration.

The data, the posterior and the tolerances are those of restoration_test.py (its docstring
derives them); this file holds the sampler x schedule x method matrix, the suite's longest
computation, so that the two test workers can run it beside the rest of restoration_test.py.
"""

import pytest
from restoration_test import B
from restoration_test import _check
from restoration_test import _run_cases

from ddpm_jax import sampling
from ddpm_jax.sampling import restoration

SCHEDULES = ("linear", "cosine", "edm")

# The samplers here run longer than they compile (16,384 images per posterior).
pytestmark = pytest.mark.usefixtures("optimized_xla")


def _cases(sampler):
  """(method, schedule) of a sampler: EDM's ladder is for the sigma-space samplers and DDIM."""
  return tuple((method, schedule) for method in restoration.METHODS for schedule in SCHEDULES
               if not (sampler == "ancestral" and schedule == "edm"))


def _posteriors(sampler):
  """{(method, schedule): (samples, mean, cov)} for every case of one sampler, under one jit."""
  # First-order samplers need more steps for the covariance: DDIM-50 has 7% too little variance
  # on this prior (0.233 vs 0.25), DDIM-200 2%.
  first_order = ("ddim", "euler", "euler_ancestral")
  steps = None if sampler == "ancestral" else 200 if sampler in first_order else 50
  # The ancestral sampler walks all 1,000 steps: a quarter of the batch keeps it fast.
  batch = B // 4 if sampler == "ancestral" else B
  cases = tuple(("sr2", method, 0.1, schedule) for method, schedule in _cases(sampler))
  out = _run_cases(cases, sampler, steps, batch)
  return {case[1::2]: value for case, value in out.items()}


@pytest.mark.slow  # 52 posteriors of 16,384 (ancestral: 4,096) samples
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
@pytest.mark.parametrize("method", restoration.METHODS)
def test_every_sampler_and_schedule_samples_the_posterior(sampler, schedule, method):
  if (method, schedule) not in _cases(sampler):
    pytest.skip("EDM's ladder is for the sigma-space samplers and DDIM.")
  _check(*_posteriors(sampler)[method, schedule])
