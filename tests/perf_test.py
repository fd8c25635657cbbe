"""Tests of the performance accounting: device peaks for MFU and the per-op profile's labels."""

import collections
import os
import re
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import perf
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


_CONV_PROBE = """
import os, sys
import ddpm_jax
import jax, jax.numpy as jnp
from jax import lax
conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.ones((8, 32, 32, 128)), jnp.ones((3, 3, 128, 128))).compile().as_text()
print(os.environ["XLA_FLAGS"]); print("ynn" if "ynn_fusion" in hlo else "xla")
"""


@pytest.mark.parametrize("user_flags, expect_flags, expect_kernels", [
    ("--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=", "xla"),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution",   # the user's choice wins
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", "ynn"),
])
def test_import_turns_off_ynnpack_on_cpu_unless_the_user_chose(user_flags, expect_flags,
                                                               expect_kernels):
  env = {**os.environ, "XLA_FLAGS": user_flags, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _CONV_PROBE], env=env, cwd=helpers.REPO_ROOT,
                       capture_output=True, text=True, timeout=300, check=True).stdout.split("\n")
  assert out[:2] == [expect_flags, expect_kernels]
