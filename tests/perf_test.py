"""Tests of the performance accounting: device peaks for MFU and the per-op profile's labels."""

import collections
import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import perf


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
