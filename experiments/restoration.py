"""Restoration of held-out digits: zero-shot solvers and the SR3 stage against the plain baselines.

For x2 super-resolution (sr2), Gaussian deblurring (blur_gauss) and 50% random-pixel inpainting
(inpaint, mask random_half) of the 360 test-split digits at measurement noise sigma_y in
{0, 0.05}: PSNR, SSIM and the consistency ||A x^ - y|| / ||y|| of

- the baselines: the measurement itself shown as an image (sr2: nearest-neighbour upsampling,
  which is A^+ y; inpaint: unknown pixels at 0), A^+ y, and bilinear upsampling (sr2);
- DDNM and PiGDM (`--mode=restore`, the unconditional digits model of configs/digits.py);
- the SR3 stage of configs/digits_sr.py on the same y (sr2 only; `--mode=sample` with
  sampling.low_res_input = y and sampling.cond_aug = sigma_y).

Every method is run through the command-line drivers, on the same y (the drivers' own
measurement noise). Writes <out>/digits_restoration.{csv,md,png}.

  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits
  python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=runs/digits_sr
  python -m experiments.restoration [--digits=runs/digits] [--sr=runs/digits_sr] \
      [--out=experiments/results]
"""

import argparse
import csv
import os
import sys
import tempfile

import numpy as np

TASKS = ("sr2", "blur_gauss", "inpaint")
SIGMAS = (0.0, 0.05)
METHODS = ("ddnm", "pigdm")
NAME = "digits_restoration"
COLUMNS = ("task", "sigma_y", "method", "psnr", "ssim", "consistency")


def _test_digits(config) -> np.ndarray:
  import grain  # pylint: disable=g-import-not-at-top

  from ddpm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  whole = grain.sharding.ShardOptions(shard_index=0, shard_count=1, drop_remainder=False)
  batch = next(iter(input_pipeline.create_eval_iterator(config, batch_size=512,
                                                        shard_options=whole)))
  return batch["image"][batch["mask"]]


def _scores(out, truth, op, y) -> dict:
  from ddpm_jax.metrics import restoration as m  # pylint: disable=g-import-not-at-top
  out = np.clip(out, -1.0, 1.0)
  means = m.summary(out, truth, ax_hat=np.asarray(op.A(out)), y=y)
  return {k: means[k] for k in ("psnr", "ssim", "consistency")}


def run(digits_dir: str, sr_dir: str, out: str) -> list[dict]:
  from configs import digits  # pylint: disable=g-import-not-at-top
  from configs import digits_sr  # pylint: disable=g-import-not-at-top
  from ddpm_jax.core import degradations  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import drivers  # pylint: disable=g-import-not-at-top

  base = digits.get_config()
  truth = _test_digits(base)
  n = len(truth)
  tmp = tempfile.mkdtemp(prefix="digits_restoration_")
  truth_path = os.path.join(tmp, "truth.npz")
  np.savez(truth_path, images=truth)
  rows, shown = [], {}
  for task in TASKS:
    for sigma_y in SIGMAS:
      config = digits.get_config()
      config.restore.update(task=task, sigma_y=sigma_y, input=truth_path, num_images=n)
      op = drivers.restore_operator(config)
      y = drivers.measure(config, op, truth)
      outputs = {"measurement": drivers.shown_measurement(op, y, truth.shape),
                 "A+y": np.asarray(op.pinv(y))}
      if task == "sr2":
        outputs["bilinear"] = np.asarray(degradations.upsample_bilinear(y, 2))
      for method in METHODS:
        config.restore.method = method
        report = drivers.restore(config, digits_dir)
        with np.load(report["npz"]) as f:
          outputs[method] = f["output_float"]
        print(f"{task} sigma_y={sigma_y:g} {method}: PSNR {report['psnr']:.2f}", flush=True)
      if task == "sr2" and sr_dir:
        sr = digits_sr.get_config()
        low_path = os.path.join(tmp, f"low_{sigma_y:g}.npz")
        np.savez(low_path, images=y)
        sr.sampling.update(low_res_input=low_path, num_samples=n, cond_aug=max(sigma_y, 0.05),
                           batch_size=512)
        path = drivers.sample(sr, sr_dir)
        with np.load(path) as f:
          outputs["sr3"] = f["samples"].astype(np.float32) / 127.5 - 1.0
      for method, x in outputs.items():
        rows.append({"task": task, "sigma_y": sigma_y, "method": method,
                     **_scores(x, truth, op, y)})
      shown[(task, sigma_y)] = outputs
  _write(rows, shown, truth, out)
  return rows


def _write(rows, shown, truth, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{NAME}.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
  lines = ["| task | sigma_y | method | PSNR (dB) | SSIM | consistency |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['sigma_y']:g} | {r['method']} | {r['psnr']:.2f} | "
                 f"{r['ssim']:.3f} | {r['consistency']:.3f} |")
  with open(os.path.join(out, f"{NAME}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  # The figure: a row per (task, sigma_y), a column per method, 4 digits side by side per cell.
  keys = list(shown)
  order = ["measurement", "A+y", "bilinear", "ddnm", "pigdm", "sr3"]
  methods = ["truth"] + sorted({m for o in shown.values() for m in o}, key=order.index)
  k = 4

  def strip(x):  # k images side by side, a blank column between them
    h, w = x.shape[1:3]
    row = np.full((h, k * (w + 1) - 1), np.nan)
    for j in range(k):
      row[:, j * (w + 1):j * (w + 1) + w] = np.clip(x[j, ..., 0], -1, 1)
    return row

  fig, axes = plt.subplots(len(keys), len(methods), squeeze=False,
                           figsize=(len(methods) * 1.6 + 0.6, len(keys) * 0.5 + 0.4))
  cmap = plt.get_cmap("gray").with_extremes(bad="white")
  for i, key in enumerate(keys):
    for c, m in enumerate(methods):
      ax = axes[i, c]
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      if i == 0:
        ax.set_title(m, fontsize=8)
      if c == 0:
        ax.set_ylabel(f"{key[0]}\nsy={key[1]:g}", fontsize=7, rotation=0, ha="right",
                      va="center")
      x = truth if m == "truth" else shown[key].get(m)
      if x is not None:
        ax.imshow(strip(x), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
  fig.tight_layout(pad=0.3, w_pad=1.0, h_pad=0.3)
  fig.savefig(os.path.join(out, f"{NAME}.png"), dpi=110, bbox_inches="tight")
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  """The command line's flags."""
  parser = argparse.ArgumentParser(prog="python -m experiments.restoration", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--digits", default="runs/digits", help="the configs/digits.py run")
  parser.add_argument("--sr", default="runs/digits_sr",
                      help="the configs/digits_sr.py run ('' to skip SR3)")
  parser.add_argument("--out", default="experiments/results")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  rows = run(args.digits, args.sr, args.out)
  print(open(os.path.join(args.out, f"{NAME}.md")).read())
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
