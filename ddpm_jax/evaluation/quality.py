"""The quality report: bits/dim, FID/IS, KID, precision/recall and the offline digits score.

`eval.num_seeds > 1` is the EDM protocol (Karras et al., 2022, who report the minimum FID over
three seeds): the Inception metrics of as many sample sets, drawn with seeds `sampling.seed`,
`+ 1`, ..., each reported with their mean, and FID's minimum.

The train loop runs it once training ends (`training.final_eval_metrics`) and `drivers.evaluate`
for `--mode=eval`; it imports neither.
"""

import json
import os
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from ddpm_jax.config import factories
from ddpm_jax.core import losses
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import fid_eval
from ddpm_jax.evaluation import generation
from ddpm_jax.runtime import mesh as mesh_lib

# The Inception metrics that `eval.num_seeds > 1` reports per seed and averaged.
_PER_SEED_KEYS = ("fid", "inception_score", "kid", "precision", "recall")


def bits_per_dim(config, model, tables, mesh, params) -> dict:
  """The full VLB (all T terms) on the eval split, with its components, in bits/dim.

  For an EDM or flow-matching network this is the bound of the discrete chain on its sigma
  ladder's tables (`factories.tables_from_config`), where the network is a model of x0."""
  d = config.diffusion
  sharding = mesh_lib.batch_sharding(mesh)

  @jax.jit
  def batch_vlb(params, x0, rng):
    def net_fn(x, t):
      return model.apply({"params": params}, x, t, train=False)
    model_fn = factories.sampler_model_fn(config, tables, net_fn)
    return losses.vlb_bpd(model_fn, tables, x0, rng, model_output=factories.model_output(config),
                          model_var=d.model_var, clip_x0=d.clip_x0)

  totals, count = {}, 0
  limit = config.eval.bpd_num_examples or float("inf")
  rng = jax.random.PRNGKey(config.training.seed + 1)
  to_host = mesh_lib.to_host
  for i, batch in enumerate(input_pipeline.create_eval_iterator(config)):
    x0 = jax.make_array_from_process_local_data(sharding, batch["image"])
    mask = to_host(jax.make_array_from_process_local_data(sharding, batch["mask"]))
    mask = mask & (np.cumsum(mask) <= limit - count)  # score exactly `bpd_num_examples` examples
    terms = {k: to_host(v) for k, v in batch_vlb(params, x0, jax.random.fold_in(rng, i)).items()}
    for k, v in terms.items():
      totals[k] = totals.get(k, 0.0) + float(np.sum(v[mask]))
    count += int(mask.sum())
    if count >= limit:
      break
  return {f"bpd_{k}": v / count for k, v in totals.items()} | {"bpd_num_examples": count}


def quality_report(config, workdir, params, mesh, model, tables, step, *, sample_fn,
                   metrics=None) -> dict:
  """Each of `metrics` (default `config.eval.metrics`); logged and written to eval/step_<N>.json.

  `sample_fn` is the sampling service of the configured sampler (`generation.make_sample_fn`).
  """
  metrics = tuple(config.eval.metrics if metrics is None else metrics)
  report = {"step": step}
  inception_metrics = [m for m in metrics if m in fid_eval.INCEPTION_METRICS]
  needs_samples = inception_metrics or "digits_score" in metrics
  if needs_samples:
    s = config.sampling
    for n in {min(s.batch_size, s.num_samples), s.num_samples % s.batch_size or s.batch_size}:
      sample_fn.compile(params, jax.random.PRNGKey(0), n)  # every batch shape, outside the timing
    start = time.perf_counter()
    # Each process keeps the samples its devices drew (their indices say where they belong).
    samples, index, _ = generation.draw_local_samples(config, sample_fn, params,
                                                      config.sampling.num_samples)
    total = config.sampling.num_samples
    report["samples_per_sec"] = total / (time.perf_counter() - start)
    report["num_samples"] = total
    report["sampler"] = factories.sampler_label(config)
    report["sampler_nfe"] = factories.sampler_nfe(config)
    if s.guide_workdir:  # autoguidance: each call also runs the guide (where w > 0)
      report.update(autoguidance_scale=float(s.autoguidance_scale), guide_workdir=s.guide_workdir,
                    guide_step=int(s.guide_step))
  if "digits_score" in metrics:
    from ddpm_jax.metrics import digits_classifier  # pylint: disable=g-import-not-at-top
    score = digits_classifier.digits_score(gather_samples(samples, index),
                                           cache_dir=cache_dir())
    report.update({f"digits_{k}": v for k, v in score.items()})
    logging.info(
        "Digits score of %d samples from %s (%d model calls each): FD %.2f against held-out "
        "real digits; floor %.2f (other held-out real digits), real train digits %.2f; %d "
        "images per FD. Mean confidence %.3f (real %.3f), IS %.2f.", total,
        report["sampler"], report["sampler_nfe"], score["frechet_distance"],
        score["frechet_distance_floor"], score["frechet_distance_train_real"],
        score["fd_num_images"], score["mean_confidence"], score["mean_confidence_real"],
        score["inception_score"])
  if inception_metrics:
    report.update(inception_report(config, workdir, sample_fn, params, (samples, index),
                                   inception_metrics))
  if "bpd" in metrics:
    report.update(bits_per_dim(config, model, tables, mesh, params))
  logging.info("Evaluation at step %d:\n%s", step, json.dumps(report, indent=2, default=str))
  if jax.process_index() == 0:
    path = epath.Path(workdir) / "eval" / f"step_{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
  return report


def gather_samples(samples: np.ndarray, index: np.ndarray) -> np.ndarray:
  """Every process's samples, whole and in index order (for the digits score's few images)."""
  every = fid_eval.gather_in_order(samples.reshape(len(samples), -1), index)
  return every.astype(np.uint8).reshape((-1,) + samples.shape[1:])


def inception_report(config, workdir, sample_fn, params, samples, metrics) -> dict:
  """`metrics` (of `fid_eval.INCEPTION_METRICS`) of `samples` = (this process's samples, their
  indices), drawn with `sampling.seed`.

  With `eval.num_seeds = S > 1`, S - 1 more sets of `sampling.num_samples` are drawn with seeds
  `sampling.seed + 1, ..., + S - 1` (one set in memory at a time) and embedded against the same
  reference. The plain keys stay those of the first seed (comparable with a one-seed report);
  `<key>_per_seed` and `<key>_mean` are added for FID, IS, KID, precision and recall, and
  `fid_min`, EDM's number.
  """
  evaluate = fid_eval.make_evaluator(config, workdir, metrics)
  total = config.sampling.num_samples
  first = evaluate(*samples, total)
  num_seeds = int(config.eval.num_seeds)
  if num_seeds == 1:
    return first
  seeds = [int(config.sampling.seed) + i for i in range(num_seeds)]
  runs = [first]
  for seed in seeds[1:]:
    seeded = config.copy_and_resolve_references()
    seeded.sampling.seed = seed
    more, index, _ = generation.draw_local_samples(seeded, sample_fn, params, total)
    runs.append(evaluate(more, index, total))
    del more
  report = dict(first, eval_seeds=seeds)
  for key in _PER_SEED_KEYS:
    if key in first:
      values = [float(r[key]) for r in runs]
      report[f"{key}_per_seed"] = values
      report[f"{key}_mean"] = float(np.mean(values))
  if "fid" in first:
    report["fid_min"] = min(report["fid_per_seed"])
    logging.info("EDM protocol, %d seeds %s: FID %s; min %.3f, mean %.3f.", num_seeds, seeds,
                 ", ".join(f"{v:.3f}" for v in report["fid_per_seed"]), report["fid_min"],
                 report["fid_mean"])
  return report


def cache_dir() -> str:
  """Where offline metric networks (the digits classifier) are cached: $DDPM_JAX_CACHE."""
  return os.environ.get("DDPM_JAX_CACHE", os.path.expanduser("~/.cache/ddpm_jax"))
