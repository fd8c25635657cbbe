"""The schedule ablation with two samplers: DDIM-50 and Heun (<= 50 calls) per schedule.

Reads <out>/digits_schedules.csv (the trained points, final eval with DDIM at 50 steps, and
bits/dim) and <out>/digits_schedules_heun_<schedule>.csv (the same checkpoints with Heun on
EDM's grid), and writes <out>/digits_schedules_samplers.{md,csv,png}.

  python -m experiments.schedules [--out=experiments/results]
"""

import argparse
import csv
import os
import sys

from experiments import collate
from experiments.sweeps import digits_schedules

NAME = "digits_schedules_samplers"
COLUMNS = ("schedule", "bpd", "ddim_nfe", "ddim_fd", "ddim_confidence", "heun_nfe", "heun_fd",
           "heun_confidence", "fd_floor")


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return [r for r in csv.DictReader(f) if r.get("status") == "done"]


def _float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return float("nan")


def rows(out: str) -> list[dict]:
  trained = {r["schedule"]: r for r in _read(os.path.join(out, "digits_schedules.csv"))
             if r.get("num_timesteps", "1000") == "1000" and r.get("loss", "mse") == "mse"}
  table = []
  for schedule in digits_schedules.GRIDS["default"]["diffusion.schedule"]:
    ddim = dict(trained.get(schedule, {}))
    # A training sweep's table holds fewer columns than its eval report: fill from the report.
    report = os.path.join(digits_schedules.ROOT, digits_schedules.point_name(schedule))
    if ddim and os.path.isdir(report):
      ddim = {**{k: str(v) for k, v in collate.latest_eval(report).items()}, **ddim}
    heun = next(iter(_read(os.path.join(out, f"digits_schedules_heun_{schedule}.csv"))), {})
    if not ddim and not heun:
      continue
    table.append({
        "schedule": schedule, "bpd": ddim.get("bpd_total", collate.MISSING),
        "ddim_nfe": ddim.get("sampler_nfe", collate.MISSING),
        "ddim_fd": ddim.get("digits_frechet_distance", collate.MISSING),
        "ddim_confidence": ddim.get("digits_mean_confidence", collate.MISSING),
        "heun_nfe": heun.get("sampler_nfe", collate.MISSING),
        "heun_fd": heun.get("digits_frechet_distance", collate.MISSING),
        "heun_confidence": heun.get("digits_mean_confidence", collate.MISSING),
        "fd_floor": ddim.get("digits_frechet_distance_floor",
                             heun.get("digits_frechet_distance_floor", collate.MISSING))})
  return table


def _fmt(value, spec: str) -> str:
  v = _float(value)
  return collate.MISSING if v != v else format(v, spec)


def write(table: list[dict], out: str) -> None:
  with open(os.path.join(out, f"{NAME}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table)
  lines = [f"# `{NAME}`: the digits schedule ablation, two samplers per schedule", "",
           "Six schedules at T = 1000, 1,500 training steps each, 500 EMA samples per sampler; "
           "digits FD against held-out real digits (lower is better) and the mean confidence of "
           "the digits classifier. Commands: experiments/sweeps/digits_schedules.py; table: "
           "`python -m experiments.schedules`.", "", f"![FD per schedule]({NAME}.png)", "",
           "| schedule | bits/dim | DDIM calls | DDIM FD | DDIM conf. | Heun calls | Heun FD "
           "| Heun conf. | FD floor |", "|---|---|---|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['schedule']} | {_fmt(r['bpd'], '.3f')} | {_fmt(r['ddim_nfe'], '.0f')} "
                 f"| {_fmt(r['ddim_fd'], '.1f')} | {_fmt(r['ddim_confidence'], '.3f')} | "
                 f"{_fmt(r['heun_nfe'], '.0f')} | {_fmt(r['heun_fd'], '.1f')} | "
                 f"{_fmt(r['heun_confidence'], '.3f')} | {_fmt(r['fd_floor'], '.1f')} |")
  with open(os.path.join(out, f"{NAME}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plt = collate._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(7, 3.5))
  x = range(len(table))
  ax.bar([i - 0.2 for i in x], [_float(r["ddim_fd"]) for r in table], 0.4, label="DDIM, 50 calls")
  ax.bar([i + 0.2 for i in x], [_float(r["heun_fd"]) for r in table], 0.4,
         label="Heun (EDM grid), <= 50 calls")
  floors = [_float(r["fd_floor"]) for r in table]
  if floors and floors[0] == floors[0]:
    ax.axhline(floors[0], color="grey", ls=":", label="floor (held-out real)")
  ax.set_xticks(list(x), [r["schedule"] for r in table])
  ax.set_ylabel("digits FD")
  ax.set_title("Schedule ablation on the digits, two samplers")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{NAME}.png"), dpi=120)
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  """The command line's flags."""
  parser = argparse.ArgumentParser(prog="python -m experiments.schedules", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  table = rows(args.out)
  if not table:
    print(f"No digits_schedules results in {args.out}: run the sweeps first (see "
          "experiments/sweeps/digits_schedules.py).", file=sys.stderr)
    return 1
  write(table, args.out)
  print(f"Wrote {args.out}/{NAME}.md, .csv and .png ({len(table)} schedules).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
