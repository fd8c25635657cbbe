"""Post-hoc EMA sweep on digits: the digits score of the EMA of each sigma_rel, rebuilt after
training.

Train once with post-hoc EMA (two tracked widths, snapshots every 100 steps), then rebuild and
score the EMA of every width at the last step, plus the run's own classic EMA (ema_decay):

  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits_phema \\
      --config.training.phema_sigma_rels='(0.05, 0.10)' --config.training.phema_snapshot_every=100
  python -m experiments.phema_sweep --workdir=runs/digits_phema

Each width is written to <workdir>/phema_sweep/sigma_rel_<s> by `training.posthoc_ema_io` (what
`python -m ddpm_jax.posthoc_ema` does; an existing one of the same width and step is reused) and
scored as `--mode=eval` with the digits score only. Writes experiments/results/digits_phema.csv,
.md (the table) and .png (FD and mean confidence against sigma_rel, the classic EMA dashed).
"""

import argparse
from collections.abc import Sequence
import csv
import datetime
import json
import os
import sys

SIGMA_RELS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = (("sigma_rel", "sigma_rel", "{}"), ("digits_frechet_distance", "digits FD", "{:.2f}"),
           ("digits_frechet_distance_floor", "FD floor", "{:.2f}"),
           ("digits_mean_confidence", "mean confidence", "{:.3f}"),
           ("digits_inception_score", "digits IS", "{:.2f}"), ("step", "step", "{}"),
           ("num_samples", "samples", "{}"), ("sampler", "sampler", "{}"))


def build_parser() -> argparse.ArgumentParser:
  """The command line's flags."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="A digits run trained with "
                      "training.phema_sigma_rels (its snapshots in <workdir>/phema).")
  parser.add_argument("--sigma_rels", default=",".join(str(s) for s in SIGMA_RELS),
                      help="Comma-separated widths to rebuild and score.")
  parser.add_argument("--step", type=int, default=None, help="Snapshot step (default: newest).")
  parser.add_argument("--num_samples", type=int, default=None,
                      help="Samples per point (default: the run's sampling.num_samples).")
  parser.add_argument("--out", default=RESULTS, help="Folder of the tables and the plot.")
  parser.add_argument("--name", default="digits_phema", help="Stem of the output files.")
  parser.add_argument("--no_baseline", action="store_true",
                      help="Skip scoring the run's own (ema_decay) EMA.")
  return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def _eval_config(workdir: str, num_samples: int | None):
  from configs import workdir as workdir_config  # pylint: disable=g-import-not-at-top
  config = workdir_config.get_config(workdir)
  config.eval.metrics = ("digits_score",)
  config.sampling.use_ema = True
  if num_samples:
    config.sampling.num_samples = num_samples
  return config


def _reconstruct(run: str, sigma_rel: float, step: int | None) -> str:
  from ddpm_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import posthoc_ema_io  # pylint: disable=g-import-not-at-top
  out = os.path.join(run, "phema_sweep", f"sigma_rel_{sigma_rel:g}")
  record_path = os.path.join(out, checkpointing.IMPORTED_FILE)
  if os.path.exists(record_path):
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("sigma_rel") == sigma_rel and (step is None or record.get("step") == step):
      newest = posthoc_ema_io.list_snapshots(run)[-1].step
      if step is not None or record.get("step") == newest:
        return out
    raise FileExistsError(f"{out} holds another reconstruction ({record.get('sigma_rel')} at "
                          f"step {record.get('step')}); delete it to rebuild.")
  # The sweep charts widths beyond the two tracked ones on purpose: those are extrapolations,
  # which the library refuses unless asked; each is logged with its coefficients and recorded as
  # "extrapolated" in its imported.json.
  posthoc_ema_io.write_reconstruction(run, out, sigma_rel, step=step, allow_extrapolation=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from ddpm_jax.evaluation import drivers  # pylint: disable=g-import-not-at-top
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import posthoc_ema_io  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  snapshots = posthoc_ema_io.list_snapshots(args.workdir)
  if not snapshots:
    print(f"No post-hoc EMA snapshots in {posthoc_ema_io.snapshot_dir(args.workdir)}; train with "
          "--config.training.phema_sigma_rels='(0.05, 0.10)'.", file=sys.stderr)
    return 2
  sigma_rels = [float(s) for s in args.sigma_rels.split(",") if s.strip()]
  rows = []
  for sigma_rel in sigma_rels:
    out = _reconstruct(args.workdir, sigma_rel, args.step)
    report = drivers.evaluate(_eval_config(out, args.num_samples), out)
    rows.append({"sigma_rel": sigma_rel, **report})
    print(f"sigma_rel {sigma_rel:g}: digits FD {report['digits_frechet_distance']:.2f}, mean "
          f"confidence {report['digits_mean_confidence']:.3f}")
  baseline = None
  if not args.no_baseline:
    config = _eval_config(args.workdir, args.num_samples)
    baseline = {"sigma_rel": f"ema_decay={config.training.ema_decay}",
                **drivers.evaluate(config, args.workdir)}
  paths = write_results(args, snapshots, rows, baseline)
  print("Wrote " + ", ".join(paths))
  return 0


def _cell(row: dict, key: str, spec: str) -> str:
  value = row.get(key)
  if value is None:
    return "-"
  try:
    return spec.format(value)
  except (TypeError, ValueError):
    return str(value)


def write_results(args, snapshots, rows: list[dict], baseline: dict | None) -> list[str]:
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, args.name)
  table = rows + ([baseline] if baseline else [])
  with open(stem + ".csv", "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([key for key, _, _ in COLUMNS])
    writer.writerows([[row.get(key, "") for key, _, _ in COLUMNS] for row in table])
  tracked = ", ".join(f"{s:g}" for s in snapshots[-1].sigma_rels)
  used = [s for s in snapshots if args.step is None or s.step <= args.step]
  header = [
      f"# Post-hoc EMA on digits (`{args.name}`)", "",
      f"`python -m experiments.phema_sweep --workdir={args.workdir}`", "",
      f"Run {args.workdir}: tracked sigma_rel {tracked}; {len(used)} snapshots (steps "
      f"{used[0].step}..{used[-1].step}). Each row rebuilds the EMA of its sigma_rel at step "
      f"{used[-1].step} (EDM2 sec. 3) and scores it with the digits score"
      + ("; the last row is the run's own EMA (training.ema_decay)" if baseline else "") +
      f". Collated {datetime.datetime.now():%Y-%m-%d %H:%M}.", "",
      f"![sigma_rel]({args.name}.png)", "",
      "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
      "|" + "---|" * len(COLUMNS)]
  lines = ["| " + " | ".join(_cell(row, k, spec) for k, _, spec in COLUMNS) + " |"
           for row in table]
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(header + lines) + "\n")
  _plot(rows, baseline, stem + ".png")
  return [stem + ".csv", stem + ".md", stem + ".png"]


def _plot(rows: list[dict], baseline: dict | None, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  xs = [r["sigma_rel"] for r in rows]
  for ax, key, title in ((axes[0], "digits_frechet_distance", "digits FD (lower is better)"),
                         (axes[1], "digits_mean_confidence",
                          "mean confidence (higher is better)")):
    ax.plot(xs, [r[key] for r in rows], marker="o", label="post-hoc EMA")
    if baseline is not None:
      ax.axhline(baseline[key], color="k", linestyle="--", label=str(baseline["sigma_rel"]))
    if key == "digits_frechet_distance" and rows:
      ax.axhline(rows[0]["digits_frechet_distance_floor"], color="gray", linestyle=":",
                 label="floor (real vs real)")
    ax.set(xlabel="sigma_rel", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  from ddpm_jax.runtime import process_env  # pylint: disable=g-import-not-at-top
  process_env.set_defaults()
  sys.exit(main())
