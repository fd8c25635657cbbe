"""Which attention kernel `ddpm_jax.models.layers.attention` runs on this machine, and that it
runs: DiT-B/2's heads (12 x 64) and the CIFAR-10 U-Net's single 256-wide head, in bfloat16.

  python benchmarks/attention_kernel.py
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from ddpm_jax.models import layers  # pylint: disable=wrong-import-position


def main() -> None:
  found = []
  for heads, width in ((12, 64), (1, 256)):
    q = jnp.ones((8, 256, heads, width), jnp.bfloat16)
    jax.block_until_ready(jax.jit(layers.attention)(q, q, q))
    found.append(f"{heads} x {width}: {layers.attention_implementation(q.dtype, width)}")
  print("attention kernels: " + "; ".join(found))


if __name__ == "__main__":
  main()
