"""The objectives table: each trained objective with its best sampler at each model-call budget.

Reads the four sample-only sweeps of `experiments/sweeps/digits_objectives.py`
(<out>/digits_objectives_<objective>.csv) and writes <out>/digits_objectives_best.{md,csv,png}
(the training sweep's own table and loss curves are <out>/digits_objectives.*): per
objective and budget (10, 20, 50 calls) the sampler with the lowest digits FD, its calls, FD,
mean confidence and IS, and a plot of FD against calls.

  python -m experiments.objectives [--out=experiments/results]
"""

import argparse
import csv
import os
import sys

from experiments import collate
from experiments.sweeps import digits_objectives

SWEEP = "digits_objectives"  # the sweeps write <out>/digits_objectives_<objective>.csv
NAME = "digits_objectives_best"  # this table
# What each objective's network predicts, its loss weight and how it is sampled here
# (docs/objectives.md).
DESCRIPTION = {
    "eps": "DDPM eps (L_simple)",
    "v": "DDPM v (Salimans & Ho 2022)",
    "edm": "EDM (Karras et al. 2022)",
    "flow": "flow matching (Lipman et al. 2023)",
}
COLUMNS = ("objective", "budget", "sampler", "sampler_nfe", "digits_frechet_distance",
           "digits_frechet_distance_floor", "digits_mean_confidence", "digits_inception_score")


def _float(value: str) -> float:
  try:
    return float(value)
  except ValueError:
    return float("inf")


def best_rows(results: dict[str, list[dict]]) -> list[dict]:
  """Per objective and budget (the 'nfe<N>' of the point name), the row with the lowest FD."""
  out = []
  for objective, rows in results.items():
    by_budget = {}
    for row in rows:
      budget = int(row["point"].rsplit("nfe", 1)[1])
      best = by_budget.get(budget)
      if best is None or (_float(row["digits_frechet_distance"])
                          < _float(best["digits_frechet_distance"])):
        by_budget[budget] = row
    for budget in sorted(by_budget):
      row = by_budget[budget]
      out.append({"objective": objective, "budget": budget,
                  **{k: row.get(k, collate.MISSING) for k in COLUMNS[2:]}})
  return out


def read_results(out: str) -> dict[str, list[dict]]:
  results = {}
  for objective in digits_objectives.OBJECTIVES:
    path = os.path.join(out, f"{SWEEP}_{objective}.csv")
    if os.path.exists(path):
      with open(path, newline="") as f:
        results[objective] = [r for r in csv.DictReader(f) if r.get("status") == "done"]
  return results


def write(rows: list[dict], out: str) -> None:
  with open(os.path.join(out, f"{NAME}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"# `{NAME}`: each objective with its best sampler per budget", "",
           "Four digits models at the quickstart's budget (2,500 steps, batch 64), 500 EMA "
           "samples per point; FD against held-out real digits (lower is better). Commands: "
           "experiments/sweeps/digits_objectives.py; table: `python -m experiments.objectives`.",
           "", f"![FD against model calls]({NAME}.png)", "",
           "| objective | budget | best sampler | calls | digits FD | FD floor | mean confidence "
           "| digits IS |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {DESCRIPTION[r['objective']]} | {r['budget']} | {r['sampler']} | "
                 f"{r['sampler_nfe']} | {_fmt(r['digits_frechet_distance'], '.1f')} | "
                 f"{_fmt(r['digits_frechet_distance_floor'], '.1f')} | "
                 f"{_fmt(r['digits_mean_confidence'], '.3f')} | "
                 f"{_fmt(r['digits_inception_score'], '.2f')} |")
  with open(os.path.join(out, f"{NAME}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plt = collate._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(6, 4))
  for objective in DESCRIPTION:
    mine = [r for r in rows if r["objective"] == objective]
    if mine:
      ax.plot([_float(r["sampler_nfe"]) for r in mine],
              [_float(r["digits_frechet_distance"]) for r in mine], "o-",
              label=DESCRIPTION[objective])
  floors = [_float(r["digits_frechet_distance_floor"]) for r in rows]
  if floors:
    ax.axhline(min(floors), color="grey", ls=":", label="floor (held-out real)")
  ax.set_xscale("log")
  ax.set_xlabel("model calls per sample")
  ax.set_ylabel("digits FD (best sampler)")
  ax.set_title("Digits FD against model calls, per objective")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{NAME}.png"), dpi=120)
  plt.close(fig)


def _fmt(value, spec: str) -> str:
  v = _float(value)
  return collate.MISSING if v == float("inf") else format(v, spec)


def build_parser() -> argparse.ArgumentParser:
  """The command line's flags."""
  parser = argparse.ArgumentParser(prog="python -m experiments.objectives", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  results = read_results(args.out)
  if not results:
    print(f"No {SWEEP}_<objective>.csv in {args.out}: run the sweeps first (see "
          "experiments/sweeps/digits_objectives.py).", file=sys.stderr)
    return 1
  rows = best_rows(results)
  write(rows, args.out)
  print(f"Wrote {args.out}/{NAME}.md, .csv and .png ({len(rows)} rows).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
