"""validate_config: every bad choice fails with a message naming the key and the fix."""

import pytest

from configs import base
from configs import cifar10
from configs import digits
from ddpm_jax import config_lib


def _digits(**overrides):
  config = digits.get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.mark.parametrize("overrides, match", [
    ({"diffusion.schedule": "nope"}, r"diffusion.schedule 'nope'.*cosine"),
    ({"diffusion.loss": "l1"}, r"diffusion.loss 'l1'.*hybrid"),
    ({"sampling.sampler": "unipc"}, r"sampling.sampler 'unipc'.*dpm_solver_pp"),
    ({"model.dtype": "float16"}, r"model.dtype 'float16'.*bfloat16"),
    ({"eval.metrics": ("fid", "kid")}, r"eval metric 'kid'"),
    ({"training.log_every": 0}, r"training.log_every must be positive"),
    ({"sampling.num_steps": 2000}, r"num_steps must be in \[1, 1000\]"),
    ({"diffusion.zero_terminal_snr": True}, r"model_output=v"),
    ({"diffusion.schedule": "jsd", "diffusion.clip_x0": False}, r"abar_T = 0.*clip_x0=True"),
    ({"diffusion.model_var": "learned_range"}, r"hybrid"),  # mse would leave the variance untrained
    ({"training.batch_size": 6}, r"training.batch_size=6 does not divide over the 4 devices"),
])
def test_bad_choices_fail_with_the_fix(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(_digits(**overrides), check_data=False)


def test_valid_configs_pass():
  config_lib.validate_config(digits.get_config(), check_data=False)
  config_lib.validate_config(_digits(**{"diffusion.schedule": "jsd"}), check_data=False)
  config_lib.validate_config(
      _digits(**{"diffusion.zero_terminal_snr": True, "diffusion.model_output": "v"}),
      check_data=False)


def test_digits_score_needs_the_digits_dataset():
  config = cifar10.get_config()
  config.eval.metrics = ("digits_score",)
  with pytest.raises(ValueError, match="digits_score.*cifar10"):
    config_lib.validate_config(config, check_data=False)


def test_config_diff_lists_exactly_the_changed_leaves():
  diff = config_lib.config_diff(digits.get_config(), base.get_config())
  assert diff["data.dataset"] == ("cifar10", "digits")
  assert diff["model.ch"] == (128, 32)
  assert "optim.grad_clip" not in diff  # unchanged
  assert config_lib.config_diff(base.get_config(), base.get_config()) == {}
