"""W1 / floor of every sampler on data with an exact score, at NFE 5-50 (no timing: CPU is fine).

The data, the exact-eps model and the error are those of tests/sampling_exact_score_test.py: a
per-pixel mixture 1/2 N(0.5, 0.1^2) + 1/2 N(-0.5, 0.1^2), linear schedule, T = 1000, 4096 pixels,
no clipping; 1.0 is the W1 distance between two independent samples of the data.

  python benchmarks/exact_score_samplers.py                # every sampler, its default grid
  python benchmarks/exact_score_samplers.py --grid karras  # every sampler but ancestral on a grid
  python benchmarks/exact_score_samplers.py --schedule cosine --zero_terminal_snr
  python benchmarks/exact_score_samplers.py --matrix 20    # every sampler x every schedule, NFE 20
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

import sampling_exact_score_test as exact  # noqa: E402

from ddpm_jax import sampling  # noqa: E402
from ddpm_jax.core import schedules  # noqa: E402
from ddpm_jax.runtime import process_env  # noqa: E402

NFES = tuple(int(n) for n in os.environ.get("NFES", "5,10,15,20,25,50").split(","))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", default="default", choices=("default", *sampling.GRIDS))
  parser.add_argument("--samplers", default=",".join(sampling.SAMPLERS))
  parser.add_argument("--schedule", default="linear", choices=tuple(schedules.SCHEDULES))
  parser.add_argument("--zero_terminal_snr", action="store_true")
  parser.add_argument("--matrix", type=int, default=0,
                      help="NFE: print every sampler x every schedule (+- zero terminal SNR)")
  args = parser.parse_args()
  if args.matrix:
    return matrix(args.matrix, args.samplers.split(","), args.grid)
  print("| sampler | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
  print("|---|---|" + "---|" * len(NFES))
  for name in args.samplers.split(","):
    grid = "uniform" if name == "ancestral" else args.grid
    shown = sampling.DEFAULT_GRIDS[name] if grid == "default" else grid
    cells = []
    for n in NFES:
      calls = sampling.nfe(name, exact.num_steps(name, n),
                           exact._tables(args.schedule, args.zero_terminal_snr), grid)
      err = exact.error(name, n, grid, args.schedule, args.zero_terminal_snr)
      cells.append(f"{err:.2f}" if calls == n else f"{err:.2f} ({calls})")
    print(f"| {name} | {shown} | " + " | ".join(cells) + " |", flush=True)


def matrix(nfe, names, grid):
  """Rows: samplers; columns: schedules, '+z' with zero terminal SNR; cells: W1 / floor."""
  cols = [(name, z) for name in schedules.SCHEDULES for z in (False, True)]
  print(f"NFE {nfe}, each sampler on {'its default grid' if grid == 'default' else grid}")
  print("| sampler | " + " | ".join(n + ("+z" if z else "") for n, z in cols) + " |")
  print("|---|" + "---:|" * len(cols))
  for name in names:
    g = "uniform" if name == "ancestral" else grid
    cells = [f"{exact.error(name, nfe, g, n, z):.2f}" for n, z in cols]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  process_env.set_defaults()  # an entry point: before jax starts a backend
  main()
