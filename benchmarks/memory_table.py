"""The largest U-Net and DiT a train step fits per chip, replicated and sharded, from the code's
own accounting (`ddpm_jax.runtime.sharding.train_bytes_per_param`; the state's share per device
is checked against the compiled step's memory analysis in tests/sharding_test.py).

  python benchmarks/memory_table.py

Activations are left out (they depend on the batch per chip, and remat trades them for compute),
so each figure is an upper bound on the model size. Chip memory: TPU v5e 16 GiB, TPU v5p 95 GiB,
an 80 GB GPU (A100/H100 80GB) 80 GB.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from ddpm_jax.runtime import sharding  # pylint: disable=wrong-import-position

CHIPS = {"TPU v5e": 16 * 2**30, "TPU v5p": 95 * 2**30, "80 GB GPU": 80e9}
COUNTS = (8, 64, 256)
# Reference sizes (params): DDPM's CIFAR-10 U-Net, EDM2-XXL, DiT-XL/2 (Peebles & Xie 2023).
MODELS = {"DDPM CIFAR-10 U-Net": 35.7e6, "DiT-XL/2": 675e6, "EDM2-XXL": 1.5e9}


def main() -> None:
  header = ["chip", "replicated"] + [f"sharded over {n}" for n in COUNTS]
  print("| " + " | ".join(header) + " |")
  print("|---" * len(header) + "|")
  for chip, memory in CHIPS.items():
    cells = [memory / sharding.train_bytes_per_param(1, False)]
    cells += [memory / sharding.train_bytes_per_param(n, True) for n in COUNTS]
    print(f"| {chip} | " + " | ".join(f"{c / 1e9:.2f}B" for c in cells) + " |")
  print()
  print("bytes per parameter: replicated "
        f"{sharding.train_bytes_per_param(1, False):g}; sharded over " +
        ", ".join(f"{n}: {sharding.train_bytes_per_param(n, True):.3f}" for n in COUNTS))
  for name, params in MODELS.items():
    fits = [chip for chip, memory in CHIPS.items()
            if params * sharding.train_bytes_per_param(1, False) <= memory]
    print(f"{name} ({params / 1e6:,.0f}M): replicated fits on {', '.join(fits) or 'none'}")


if __name__ == "__main__":
  main()
