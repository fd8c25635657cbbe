"""Classifier-free guidance scale w on one trained `digits_cond` checkpoint (sampling only).

For each w in {0, 0.5, 1, 2, 4}: 500 samples, 50 of each class (sampling.class_label = -1), with
the config's sampler (DDIM, 50 steps), scored by the digits classifier of `quality`:
  * agreement: fraction of samples the classifier labels as the requested class;
  * FD: the digits Frechet distance to held-out real digits (`digits_score`), and its floor;
  * IS-like: exp(E KL(p(y|x) || p(y))) of the classifier (max 10).

  python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond  # once
  python -m experiments.sweeps.digits_guidance --workdir=runs/digits_cond

Writes experiments/results/digits_guidance.{csv,md,png}.
"""

import csv
import functools
import os
import sys
import types

from absl import app
from absl import flags
import numpy as np

SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> types.SimpleNamespace:
  """Defines this program's flags on `flag_values` (nothing is defined at import)."""
  f = flag_values
  return types.SimpleNamespace(
      workdir=flags.DEFINE_string("workdir", "runs/digits_cond", "A trained digits_cond run.",
                                  flag_values=f),
      out=flags.DEFINE_string("out", "experiments/results", "Where the table and plot go.",
                              flag_values=f),
      num_samples=flags.DEFINE_integer("num_samples", 500, "Samples per guidance scale (50 per "
                                       "class).", flag_values=f))


def run(workdir: str, out_dir: str, num_samples: int) -> list[dict]:
  # pylint: disable=g-import-not-at-top
  from configs import digits_cond
  from ddpm_jax.config import conditioning
  from ddpm_jax.config import validation
  from ddpm_jax.evaluation import drivers
  from ddpm_jax.evaluation import generation
  from ddpm_jax.evaluation import quality
  from ddpm_jax.metrics import digits_classifier
  # pylint: enable=g-import-not-at-top

  config = digits_cond.get_config()
  loaded = drivers.load(config, workdir, validation.validate(config, mode="sample"))
  variables, _ = digits_classifier.get_digits_classifier(quality.cache_dir())
  rows = []
  for w in SCALES:
    c = config.copy_and_resolve_references()
    c.unlock()
    c.sampling.guidance_scale, c.sampling.class_label = w, -1
    c.sampling.batch_size = 500 if num_samples % 500 == 0 else num_samples
    # The loaded run's sampler and params, guided with this config's scale and labels.
    samples, _ = generation.draw_samples(c, drivers.sample_fn(c, loaded), loaded.params,
                                         num_samples)
    requested = np.concatenate([conditioning.sample_labels(c, c.sampling.batch_size)] *
                               (num_samples // c.sampling.batch_size))
    logits = digits_classifier.digits_features(variables, samples)["logits"]
    score = digits_classifier.digits_score(samples, quality.cache_dir())
    rows.append({"w": w, "agreement": float(np.mean(np.argmax(logits, -1) == requested)),
                 "fd": score["frechet_distance"], "fd_floor": score["frechet_distance_floor"],
                 "is_like": score["inception_score"], "step": loaded.step})
    print(f"w={w}: agreement {rows[-1]['agreement']:.3f}, FD {rows[-1]['fd']:.2f} "
          f"(floor {rows[-1]['fd_floor']:.2f}), IS-like {rows[-1]['is_like']:.2f}", flush=True)
  write(rows, out_dir)
  return rows


def write(rows: list[dict], out_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "digits_guidance.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| w | class agreement | digits FD (floor) | IS-like |", "|---|---|---|---|"]
  lines += [f"| {r['w']} | {r['agreement']:.3f} | {r['fd']:.2f} ({r['fd_floor']:.2f}) | "
            f"{r['is_like']:.2f} |" for r in rows]
  with open(os.path.join(out_dir, "digits_guidance.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.plot([r["fd"] for r in rows], [r["agreement"] for r in rows], "o-")
  for r in rows:
    ax.annotate(f"w={r['w']:g}", (r["fd"], r["agreement"]), textcoords="offset points",
                xytext=(4, -10))
  ax.set_xlabel("digits FD (lower is better)")
  ax.set_ylabel("class agreement")
  ax.set_title(f"Classifier-free guidance, digits_cond step {rows[0]['step']}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "digits_guidance.png"), dpi=120)


def main(argv, args: types.SimpleNamespace):
  del argv
  run(args.workdir.value, args.out.value, args.num_samples.value)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from ddpm_jax.runtime import process_env  # pylint: disable=g-import-not-at-top
  process_env.set_defaults()  # an entry point: before jax starts a backend
  app.run(functools.partial(main, args=define_flags()))
