"""Autoguidance by another checkpoint (`sampling.guide_workdir`, `guide_step`) through
`--mode=sample`: a guide equal to the model changes nothing for any w, w = 0 is plain sampling
bitwise, an earlier checkpoint changes the samples, and bad guides fail before sampling.
The sampler-level maths (every sampler, the interval) is in autoguidance_test."""

import numpy as np
import pytest

from ddpm_jax.evaluation import drivers
from ddpm_jax.training import train

from helpers import tiny_config

pytestmark = pytest.mark.slow

BASE = {"training.num_train_steps": 4, "training.checkpoint_every": 2,
        "training.keep_checkpoints": 5, "optim.lr": 3e-3, "optim.warmup_steps": 0,
        "sampling.sampler": "dpm_solver_pp", "sampling.num_steps": 5,
        "sampling.num_samples": 8,
        "sampling.use_ema": False}  # 4 steps barely move an EMA of decay 0.995


@pytest.fixture(scope="module", params=["ddpm", "edm"])
def run(request, tmp_path_factory):
  """(overrides, workdir) of a tiny run with checkpoints at steps 2 and 4."""
  overrides = {**BASE, "diffusion.parameterization": request.param}
  workdir = str(tmp_path_factory.mktemp(request.param))
  train.train_and_evaluate(tiny_config(**overrides), workdir)
  return overrides, workdir


def _sample(overrides, workdir, **guide):
  config = tiny_config(**{**overrides, **{f"sampling.{k}": v for k, v in guide.items()}})
  with np.load(drivers.sample(config, workdir)) as data:
    return data["samples"].astype(np.int32)


def test_guide_equal_to_the_model_or_w_zero_is_plain_sampling(run):
  overrides, workdir = run
  plain = _sample(overrides, workdir)
  # w = 0: the guide is loaded but the sampler is the plain one, bitwise.
  np.testing.assert_array_equal(
      _sample(overrides, workdir, guide_workdir=workdir, guide_step=2, autoguidance_scale=0.0),
      plain)
  # The model guiding itself: (1 + w) D - w D = D up to float rounding (uint8 pixels).
  same = _sample(overrides, workdir, guide_workdir=workdir, guide_step=4, autoguidance_scale=2.0)
  assert np.max(np.abs(same - plain)) <= 1
  # An earlier, weaker checkpoint moves the samples.
  guided = _sample(overrides, workdir, guide_workdir=workdir, guide_step=2,
                   autoguidance_scale=2.0)
  assert np.mean(np.abs(guided - plain)) > 2.0


@pytest.mark.parametrize("guide,message", [
    ({"guide_step": 3, "autoguidance_scale": 1.0}, r"checkpoints at steps \[2, 4\]"),
    ({"autoguidance_scale": -1.0}, "must be >= 0"),
    ({"guide_workdir": "", "autoguidance_scale": 1.0}, "needs a guide"),
])
def test_bad_guides_fail_naming_the_fix(run, guide, message):
  overrides, workdir = run
  guide = {"guide_workdir": workdir, **guide}
  with pytest.raises(ValueError, match=message):
    _sample(overrides, workdir, **guide)


def test_a_guide_of_another_parameterization_is_refused(run, tmp_path):
  overrides, workdir = run
  other = "flow" if overrides["diffusion.parameterization"] == "ddpm" else "ddpm"
  guide_dir = str(tmp_path / other)
  train.train_and_evaluate(tiny_config(**{**BASE, "training.num_train_steps": 2,
                                          "diffusion.parameterization": other}), guide_dir)
  with pytest.raises(ValueError, match="not a model of the same process"):
    _sample(overrides, workdir, guide_workdir=guide_dir, autoguidance_scale=1.0)
