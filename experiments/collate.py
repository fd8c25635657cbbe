"""A sweep's results: a Markdown and a CSV table, and three PNG plots.

For each point this reads its workdir's metrics history (`logging_lib.read_metrics`: a resumed
segment supersedes the steps after its checkpoint) and its newest `eval/step_<N>.json`, and
writes to the output directory:

  <sweep>.md, <sweep>.csv   one row per point; '-' where a value is missing
  <sweep>_log_snr.png       log-SNR(t) = log(abar_t / (1 - abar_t)) against t/T, for every
                            (schedule, T) of the sweep, from `ddpm_jax.core.schedules`
  <sweep>_loss_curves.png   training loss against step, one (EMA-smoothed) line per point
  <sweep>_metrics.png       a bar chart per metric, one bar per point
"""

from collections.abc import Mapping
from collections.abc import Sequence
import csv
import dataclasses
import json
import math
import os
import re
import time
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from ddpm_jax.core import denoisers
from ddpm_jax.core import schedules
from ddpm_jax.runtime import logging_lib

DONE_MARKER = "sweep_done.json"  # written by the runner when a point's run finishes
FAILED_MARKER = "sweep_failed.json"  # ... and this one when it fails or stops early
LOSS_WINDOW = 5  # the final loss is the mean of this many last logged losses
MISSING = "-"
_LOSS_SMOOTHING = 0.6  # EMA weight of the loss curves (TensorBoard's default)

# (row key, header, Markdown format); eval keys are those of eval/step_<N>.json.
_STEPS = ("steps", "steps", "d")
_LOSS = ("final_loss", "final loss", ".4g")
_BPD = ("bpd_total", "bits/dim", ".3f")
_FID = ("fid", "FID", ".2f")
_DIGITS = (("digits_frechet_distance", "digits FD", ".2f"),
           ("digits_inception_score", "digits IS", ".2f"))
_SPEED = ("samples_per_sec", "samples/s", ".1f")
# A sample-only sweep (one shared checkpoint, --mode=eval) has no training columns.
_NFE = ("sampler_nfe", "NFE", "d")
_DIGITS_SAMPLE_ONLY = (("digits_frechet_distance", "digits FD", ".2f"),
                       ("digits_frechet_distance_floor", "FD floor", ".2f"),
                       ("digits_frechet_distance_train_real", "FD train-real", ".2f"),
                       ("digits_mean_confidence", "mean confidence", ".3f"),
                       ("digits_inception_score", "digits IS", ".2f"))
_BETTER = {"final_loss": "lower", "bpd_total": "lower", "fid": "lower",
           "digits_frechet_distance": "lower", "digits_inception_score": "higher",
           "samples_per_sec": "higher", "sampler_nfe": "lower",
           "digits_frechet_distance_floor": "lower", "digits_frechet_distance_train_real": "lower",
           "digits_mean_confidence": "higher"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One point of a sweep, as collation sees it."""
  name: str
  labels: Mapping[str, str]
  workdir: str
  config: ml_collections.ConfigDict

  @property
  def status(self) -> str:
    return point_status(self.workdir)


def point_status(workdir: str) -> str:
  """'done' (marker), 'failed' (last run exited non-zero), 'partial' (started) or 'pending'."""
  workdir = epath.Path(workdir)  # local or gs://
  for status, marker in (("done", DONE_MARKER), ("failed", FAILED_MARKER)):
    if (workdir / marker).exists():
      return status
  return "partial" if workdir.exists() else "pending"


def read_metrics(workdir: str) -> list[dict]:
  """The merged metrics history of a point (see `logging_lib.read_metrics`)."""
  return logging_lib.read_metrics(workdir)


def latest_eval(workdir: str) -> dict:
  """The newest eval/step_<N>.json, or {}."""
  found = {}
  for path in epath.Path(workdir).glob("eval/step_*.json"):  # local or gs://
    match = re.fullmatch(r"step_(\d+)\.json", path.name)
    if match:
      found[int(match.group(1))] = path
  if not found:
    return {}
  return json.loads(found[max(found)].read_text())


def summarize(entry: Entry) -> dict[str, Any]:
  """The row values of a point (absent keys are missing values)."""
  records = read_metrics(entry.workdir)
  losses = [r["loss"] for r in records if "loss" in r]
  row = dict(latest_eval(entry.workdir))
  if records:
    row["steps"] = records[-1]["step"]
  if losses:
    row["final_loss"] = float(np.mean(losses[-LOSS_WINDOW:]))
  return row


def _metric_columns(entries: Sequence[Entry], rows: Sequence[dict],
                    sample_only: bool = False) -> list[tuple]:
  """Metrics the sweep's points evaluate (or that a row holds anyway)."""
  asked = set()
  for e in entries:
    asked.update(e.config.eval.metrics if sample_only else e.config.training.final_eval_metrics)
  has = lambda key: any(key in r for r in rows)
  if sample_only:
    columns = [_NFE]
    if "bpd" in asked or has(_BPD[0]):
      columns.append(_BPD)
    if "fid" in asked or has("fid"):
      columns.append(_FID)
    if "digits_score" in asked or has(_DIGITS[0][0]):
      columns.extend(_DIGITS_SAMPLE_ONLY)
    return columns + [_SPEED]
  columns = [_STEPS, _LOSS, _BPD]
  if "fid" in asked or has("fid"):
    columns.append(_FID)
  if "digits_score" in asked or has(_DIGITS[0][0]):
    columns.extend(_DIGITS)
  return columns + [_SPEED]


def _label_keys(entries: Sequence[Entry]) -> list[str]:
  """The label keys whose values differ between points (all of them if none do)."""
  keys = list(dict.fromkeys(k for e in entries for k in e.labels))
  varied = [k for k in keys if len({e.labels.get(k) for e in entries}) > 1]
  return varied or keys


def short_label(entry: Entry, keys: Sequence[str]) -> str:
  return "/".join(entry.labels.get(k, MISSING) for k in keys) or entry.name


def _styles(entries: Sequence[Entry], keys: Sequence[str]) -> list[tuple[Any, str]]:
  """(colour, line style) per point: colour by the first varied label, style by the others."""
  plt = _pyplot()
  firsts = list(dict.fromkeys(e.labels.get(keys[0]) if keys else None for e in entries))
  rests = list(dict.fromkeys(tuple(e.labels.get(k) for k in keys[1:]) for e in entries))
  cmap = plt.get_cmap("tab10")
  return [(cmap(firsts.index(e.labels.get(keys[0]) if keys else None) % 10),
           ("-", "--", ":", "-.")[rests.index(tuple(e.labels.get(k) for k in keys[1:])) % 4])
          for e in entries]


def _fmt(value: Any, spec: str) -> str:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return MISSING if value is None else str(value)
  if not math.isfinite(value):
    return MISSING
  return format(int(value) if spec == "d" else value, spec)


def write_tables(name: str, header: str, entries: Sequence[Entry], rows: Sequence[dict],
                 out: str, sample_only: bool = False) -> tuple[str, str]:
  """Writes <out>/<name>.md (with `header` above the table) and <out>/<name>.csv."""
  keys = _label_keys(entries)
  metrics = _metric_columns(entries, rows, sample_only)
  with_name = len({short_label(e, keys) for e in entries}) < len(entries)
  md_head = (["point"] if with_name else []) + keys + ["status"] + [m[1] for m in metrics]
  lines = ["| " + " | ".join(md_head) + " |", "|" + "---|" * len(md_head)]
  csv_rows = [["point", *keys, "status", *[m[0] for m in metrics]]]
  for e, row in zip(entries, rows):
    labels = [e.labels.get(k, MISSING) for k in keys]
    values = [_fmt(row.get(key), spec) for key, _, spec in metrics]
    lines.append("| " + " | ".join(([e.name] if with_name else []) + labels + [e.status] +
                                   values) + " |")
    csv_rows.append([e.name, *labels, e.status,
                     *[_fmt(row.get(key), "d" if spec == "d" else ".6g")
                       for key, _, spec in metrics]])
  md_path, csv_path = os.path.join(out, f"{name}.md"), os.path.join(out, f"{name}.csv")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(header + "\n".join(lines) + "\n")
  with open(csv_path, "w", encoding="utf-8", newline="") as f:
    csv.writer(f).writerows(csv_rows)
  return md_path, csv_path


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _curve(diffusion) -> tuple:
  """(name, T, zero terminal SNR, sigma range) of a point's noise levels: its schedule, or for an
  EDM or flow-matching point the EDM ladder it is sampled on (its schedule is unused)."""
  d = diffusion
  if getattr(d, "parameterization", "ddpm") == "ddpm":
    return d.schedule, d.num_timesteps, d.zero_terminal_snr, None
  return "EDM ladder", d.num_timesteps, False, (float(d.sigma_min), float(d.sigma_max))


def _curve_tables(name, t, zero_snr, sigmas):
  if sigmas is None:
    return schedules.make_tables(schedules.get_beta_schedule(name, t, zero_snr))
  return denoisers.tables_from_sigmas(denoisers.edm_sigmas(t, *sigmas))


def plot_log_snr(entries: Sequence[Entry], path: str) -> None:
  """log-SNR against t/T of each distinct (schedule, T, zero terminal SNR) of the sweep, and of
  the EDM ladder of its EDM / flow-matching points."""
  plt = _pyplot()
  curves = list(dict.fromkeys(_curve(e.config.diffusion) for e in entries))
  names = list(dict.fromkeys(c[0] for c in curves))
  lengths = sorted({c[1] for c in curves})
  colors = plt.get_cmap("tab10")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for schedule, t, zero_snr, sigmas in curves:
    tables = _curve_tables(schedule, t, zero_snr, sigmas)
    label = schedule + (f" T={t}" if len(lengths) > 1 else "") + (" (zero SNR)" if zero_snr else "")
    ax.plot(np.arange(1, t + 1) / t, np.asarray(tables.log_snr), label=label,
            color=colors(names.index(schedule) % 10),
            linestyle=("-", "--", ":", "-.")[lengths.index(t) % 4])
  ax.set(xlabel="t / T", ylabel="log SNR(t)", title="Noise schedules: log-SNR")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _ema(values: Sequence[float], weight: float = _LOSS_SMOOTHING) -> np.ndarray:
  """Debiased exponential moving average (as TensorBoard smooths)."""
  out, avg = [], 0.0
  for i, v in enumerate(values):
    avg = weight * avg + (1 - weight) * v
    out.append(avg / (1 - weight ** (i + 1)))
  return np.asarray(out)


def plot_loss_curves(entries: Sequence[Entry], path: str) -> None:
  plt = _pyplot()
  keys = _label_keys(entries)
  fig, ax = plt.subplots(figsize=(8, 4.5))
  positive, drawn = True, False
  for e, (color, style) in zip(entries, _styles(entries, keys)):
    records = [r for r in read_metrics(e.workdir) if "loss" in r]
    if records:
      losses = [r["loss"] for r in records]
      positive &= min(losses) > 0
      ax.plot([r["step"] for r in records], _ema(losses), label=short_label(e, keys), color=color,
              linestyle=style)
      drawn = True
  if drawn:
    ax.set_yscale("log" if positive else "linear")
    ax.legend(fontsize="small", ncol=1 + len(entries) // 12)
  else:
    ax.text(0.5, 0.5, "no training logged yet", ha="center", va="center", transform=ax.transAxes)
  ax.set(xlabel="step", ylabel=f"training loss (EMA {_LOSS_SMOOTHING})", title="Training loss")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_metrics(entries: Sequence[Entry], rows: Sequence[dict], path: str,
                 sample_only: bool = False) -> None:
  plt = _pyplot()
  keys = _label_keys(entries)
  labels = [short_label(e, keys) for e in entries]
  metrics = [m for m in _metric_columns(entries, rows, sample_only)[1:]
             if any(isinstance(r.get(m[0]), (int, float)) for r in rows)]
  ncols = max(1, min(3 if len(entries) <= 8 else 1, len(metrics)))
  nrows = max(1, math.ceil(len(metrics) / ncols))
  width = max(4.0, 0.45 * len(entries) + 1.5)
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.6 * nrows), squeeze=False)
  for ax in axes.flat[len(metrics):]:
    ax.axis("off")
  if not metrics:
    axes[0, 0].text(0.5, 0.5, "no results yet", ha="center", va="center")
  for ax, (key, title, _) in zip(axes.flat, metrics):
    values = [r.get(key) for r in rows]
    values = [v if isinstance(v, (int, float)) else np.nan for v in values]
    ax.bar(range(len(values)), values, color=[c for c, _ in _styles(entries, keys)])
    ax.set_xticks(range(len(values)), labels, rotation=60 if len(values) > 4 else 0,
                  ha="right" if len(values) > 4 else "center", fontsize="small")
    ax.set_title(f"{title} ({_BETTER[key]} is better)")
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_lines(entries: Sequence[Entry], rows: Sequence[dict], spec: Mapping[str, Any],
               path: str) -> None:
  """`spec['y']` against `spec['x']` (row or label keys), one line per `spec['series']` label.

  `spec['floor']`, a row key or a list of them, is drawn as horizontal lines (each its mean over
  the rows), e.g. the digits score of real held-out digits; `spec['logx']` puts x on a log scale.
  """
  plt = _pyplot()
  value = lambda e, r, k: r.get(k, e.labels.get(k))
  series = {}
  for e, r in zip(entries, rows):
    x, y = value(e, r, spec["x"]), value(e, r, spec["y"])
    try:
      x, y = float(x), float(y)
    except (TypeError, ValueError):
      continue
    series.setdefault(str(e.labels.get(spec.get("series"), spec["y"])), []).append((x, y))
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, (label, points) in enumerate(series.items()):
    xs, ys = zip(*sorted(points))
    ax.plot(xs, ys, marker="os^vD<>p*h"[i % 10], label=label,
            linestyle="-" if len(xs) > 1 else "none")
  floor_keys = spec.get("floor") or ()
  floors = []
  for key, style in zip([floor_keys] if isinstance(floor_keys, str) else floor_keys,
                        (":", "--", "-.")):
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if values:
      floors.append(key)
      ax.axhline(float(np.mean(values)), color="k", linestyle=style, label=key)
  if not series:
    ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
  if spec.get("logx"):
    ax.set_xscale("log")
  ax.set(xlabel=spec["x"], ylabel=spec["y"], title=spec.get("title", ""))
  ax.grid(alpha=0.3)
  if series or floors:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def collate(name: str, config_path: str, fixed: Mapping[str, Any], entries: Sequence[Entry],
            out: str, sample_only: bool = False, plot: Mapping[str, Any] | None = None
            ) -> list[str]:
  """Writes every table and plot of sweep `name` to `out`; returns their paths.

  A sample-only sweep (`sample_only`: every point evaluates one shared checkpoint) gets no
  training columns or plots; `plot` (see `plot_lines`) adds `<name>_lines.png`.
  """
  os.makedirs(out, exist_ok=True)
  rows = [summarize(e) for e in entries]
  done = sum(e.status == "done" for e in entries)
  fixed_text = ", ".join(f"`{k}={v!r}`" for k, v in fixed.items()) or "none"
  kinds = ("metrics",) if sample_only else ("log_snr", "loss_curves", "metrics")
  plots = {kind: os.path.join(out, f"{name}_{kind}.png") for kind in kinds + (
      ("lines",) if plot else ())}
  what = ("Every point samples the same checkpoint (`--mode=eval`)" if sample_only else
          f"Final loss: mean of the last {LOSS_WINDOW} logged losses")
  header = (f"# Sweep `{name}`\n\n`python -m experiments.sweep --sweep={name}`\n\n"
            f"Base config `{config_path}`; fixed overrides: {fixed_text}.\n"
            f"{len(entries)} points, {done} done; collated {time.strftime('%Y-%m-%d %H:%M')}. "
            f"{what}; metrics from the newest eval/step_<N>.json.\n\n"
            + "".join(f"![{kind}]({os.path.basename(p)})\n" for kind, p in plots.items()) + "\n")
  paths = list(write_tables(name, header, entries, rows, out, sample_only))
  if not sample_only:
    plot_log_snr(entries, plots["log_snr"])
    plot_loss_curves(entries, plots["loss_curves"])
  plot_metrics(entries, rows, plots["metrics"], sample_only)
  if plot:
    plot_lines(entries, rows, plot, plots["lines"])
  return paths + list(plots.values())
