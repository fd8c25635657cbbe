"""Tests of the performance accounting: device peaks for MFU and the per-op profile's labels."""

import collections
import json
import os
import re
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import perf
from tests import helpers


@pytest.mark.parametrize("kind, dtype, peak", [
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),   # the longer prefix wins over "TPU v5"
    ("TPU v5p", "bfloat16", 459.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 PCIe", "float32", 378.0),
    ("cpu", "float32", None),              # no published peak: the caller measures one
    ("TPU v4", "float32", None),
])
def test_peak_tflops(kind, dtype, peak):
  assert perf.peak_tflops(kind, dtype) == peak


def test_describe_ops_labels_forward_input_and_filter_gradient_convolutions():
  """Two 3x3 convs, differentiated in their weights: 2 forward convs, 2 filter gradients, and
  1 input gradient (the first conv's input needs none)."""

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def loss(ws, x):
    return jnp.sum(conv(jnp.tanh(conv(x, ws[0])), ws[1]) ** 2)

  rng = np.random.default_rng(0)
  ws = [jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32) for _ in range(2)]
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 8)), jnp.float32)
  text = jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text()
  kinds = collections.Counter(
      m.group(1) for d in perf.describe_ops(text).values()
      if (m := re.match(r"conv (\S+) window", d)))
  assert kinds == {"fwd": 2, "input-grad": 1, "filter-grad": 2}


def test_train_setup_builds_a_global_batch_over_every_device_that_the_step_takes():
  setup = perf.train_setup(helpers.tiny_config(), global_batch=8)
  assert setup.images.shape == (8, 8, 8, 1)
  assert setup.batch["image"].sharding.mesh.size == jax.device_count() == 4
  np.testing.assert_array_equal(setup.batch["image"], setup.images)
  state, metrics = setup.step_fn(setup.state, setup.batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


# Imports the package's modules, entry points included, optionally calls `set_defaults()` (argv[1]
# == "set_defaults"), then compiles a convolution: prints whether the imports left the environment
# and the SIGTERM handler as they were, the XLA_FLAGS and gcsfs variables XLA then starts with,
# and whose kernels XLA:CPU chose (YNNPACK's library fusions appear as 'ynn_fusion' in the HLO).
_CONV_PROBE = """
import json, os, signal, sys
KEYS = ("XLA_FLAGS", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
state = lambda: ({k: os.environ.get(k) for k in KEYS}, signal.getsignal(signal.SIGTERM))
before = state()
import ddpm_jax, ddpm_jax.main, ddpm_jax.pack_folder, ddpm_jax.training.train
import ddpm_jax.evaluation.drivers
unchanged = state() == before
if sys.argv[1] == "set_defaults":
  from ddpm_jax.runtime import process_env
  process_env.set_defaults()
import jax, jax.numpy as jnp
from jax import lax
conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.ones((8, 32, 32, 128)), jnp.ones((3, 3, 128, 128))).compile().as_text()
print(json.dumps({"unchanged": unchanged, "env": state()[0],
                  "kernels": "ynn" if "ynn_fusion" in hlo else "xla"}))
"""
_KEYS = ("XLA_FLAGS", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _probe(call: str, user_env: dict) -> dict:
  """The probe's report from a fresh process whose environment sets only `user_env` of KEYS."""
  env = {k: v for k, v in os.environ.items() if k not in _KEYS}  # conftest set both
  env.update({k: v for k, v in user_env.items() if v is not None}, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CONV_PROBE, call], env=env, cwd=helpers.REPO_ROOT,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("user_flags", [None, "--xla_force_host_platform_device_count=2"])
def test_importing_ddpm_jax_changes_nothing_in_the_process(user_flags):
  """A library user keeps JAX's defaults: no variable, XLA flag or signal handler is set, and
  XLA:CPU keeps YNNPACK's kernels."""
  report = _probe("import_only", {"XLA_FLAGS": user_flags})
  assert report["unchanged"]  # os.environ and signal.getsignal(SIGTERM), before and after
  assert report["env"] == {"XLA_FLAGS": user_flags, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": None}
  assert report["kernels"] == "ynn"


@pytest.mark.parametrize("user_env, expect_env, expect_kernels", [
    ({"XLA_FLAGS": None},
     {"XLA_FLAGS": _YNN_OFF, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}, "xla"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {_YNN_OFF}",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}, "xla"),
    # The user's own choices win.
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "true"},
     {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "true"}, "ynn"),
])
def test_set_defaults_turns_off_ynnpack_on_cpu_unless_the_user_chose(user_env, expect_env,
                                                                    expect_kernels):
  report = _probe("set_defaults", user_env)
  assert report["unchanged"]  # the imports before set_defaults() still change nothing
  assert report["env"] == expect_env
  assert report["kernels"] == expect_kernels
