"""validation.validate: every bad choice fails with a message naming the key and the fix."""

import pytest

from configs import base
from configs import cifar10
from configs import digits
from ddpm_jax.config import validation
from ddpm_jax.runtime import run_config


def _digits(**overrides):
  config = digits.get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


_BOTH = ("sample", "train")


@pytest.mark.parametrize("overrides, match, modes", [
    ({"diffusion.schedule": "nope"}, r"diffusion.schedule 'nope'.*cosine", _BOTH),
    ({"diffusion.loss": "l1"}, r"diffusion.loss 'l1'.*hybrid", _BOTH),
    ({"sampling.sampler": "unipc"}, r"sampling.sampler 'unipc'.*dpm_solver_pp", _BOTH),
    ({"model.dtype": "float16"}, r"model.dtype 'float16'.*bfloat16", _BOTH),
    # digits: ch 32, ch_mult (1, 2); the way up concatenates 64 + 64 and 64 + 32.
    ({"model.num_groups": 12}, r"model.num_groups=12 must divide every channel count .*: "
     r"32, 64, 96, 128 .*Valid choices: 1, 2, 4, 8, 16, 32\.", _BOTH),
    ({"eval.metrics": ("fid", "lpips")}, r"eval metric 'lpips'.*precision_recall", _BOTH),
    ({"training.log_every": 0}, r"training.log_every must be positive", _BOTH),
    ({"sampling.num_steps": 2000}, r"num_steps must be in \[1, 1000\]", _BOTH),
    ({"diffusion.zero_terminal_snr": True}, r"model_output=v", _BOTH),
    ({"diffusion.schedule": "jsd", "diffusion.clip_x0": False}, r"abar_T = 0.*clip_x0=True",
     _BOTH),
    # mse would leave the variance untrained: a rule of the training loss, which only
    # --mode=train builds.
    ({"diffusion.model_var": "learned_range"}, r"hybrid", ("train",)),
    ({"training.batch_size": 6}, r"training.batch_size=6 is not divisible by the 4 devices",
     _BOTH),
])
def test_bad_choices_fail_with_the_fix(overrides, match, modes):
  for mode in modes:
    with pytest.raises(ValueError, match=match):
      validation.validate(_digits(**overrides), mode=mode)


def test_valid_configs_pass():
  validation.validate(digits.get_config(), mode="sample")
  validation.validate(_digits(**{"diffusion.schedule": "jsd"}), mode="sample")
  validation.validate(
      _digits(**{"diffusion.zero_terminal_snr": True, "diffusion.model_output": "v"}),
      mode="sample")


def test_digits_score_needs_the_digits_dataset():
  config = cifar10.get_config()
  config.eval.metrics = ("digits_score",)
  with pytest.raises(ValueError, match="digits_score.*cifar10"):
    validation.validate(config, mode="sample")


def test_config_diff_lists_exactly_the_changed_leaves():
  diff = run_config.config_diff(digits.get_config(), base.get_config())
  assert diff["data.dataset"] == ("cifar10", "digits")
  assert diff["model.ch"] == (128, 32)
  assert "optim.grad_clip" not in diff  # unchanged
  assert run_config.config_diff(base.get_config(), base.get_config()) == {}
