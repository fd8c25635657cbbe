"""The Fréchet distance's trace term: ddpm_jax's symmetric form against TTUR's Schur sqrtm.

  python benchmarks/fid_trace.py
  python benchmarks/fid_trace.py --dim=2048 --samples=14,5000

For each sample count, two random feature sets of `--dim` features give two covariances (the
second correlated, so that S1 S2 is not symmetric); the table has the seconds each method takes
for the whole Fréchet distance and the relative difference of the two values. With fewer samples
than features the covariances are singular, where TTUR's sqrtm is complex or non-finite.
"""

import argparse
import time
import warnings

import numpy as np
from scipy import linalg

from ddpm_jax.metrics import fid


def ttur_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """TTUR / pytorch-fid's formula: the trace of SciPy's Schur sqrtm of S1 S2 (real part)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean).real)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=2048, help="Features (Inception pool3: 2048).")
  parser.add_argument("--samples", default="14,5000",
                      help="Comma-separated sample counts per feature set.")
  return parser


def main() -> None:
  args = build_parser().parse_args()
  rng = np.random.default_rng(0)
  mix = np.eye(args.dim) + 0.1 * rng.normal(size=(args.dim, args.dim))
  print("| samples | features | symmetric form (s) | TTUR sqrtm (s) | relative difference |")
  print("|---:|---:|---:|---:|---:|")
  for n in (int(v) for v in args.samples.split(",")):
    a = rng.normal(size=(n, args.dim))
    b = rng.normal(size=(n, args.dim)) @ mix
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    start = time.perf_counter()
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = ttur_frechet_distance(mu1, s1, mu2, s2)
    t_theirs = time.perf_counter() - start
    print(f"| {n:,} | {args.dim:,} | {t_ours:.1f} | {t_theirs:.1f} | "
          f"{abs(ours - theirs) / abs(theirs):.1e} |")


if __name__ == "__main__":
  main()
