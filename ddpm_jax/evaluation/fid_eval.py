"""FID, IS, KID and precision/recall of samples against a full split's cached Inception features.

Conventions (Heusel et al. 2017 and their TTUR code; Salimans et al. 2016 for IS): pool3
features of the FID Inception-v3 (TF 2015-12-05 weights, loaded from a local file), inputs as
uint8 resized bilinearly to 299, reference statistics over the *whole* `config.eval.fid_split`
(the eval iterator drops no example), cached under a key of everything that changes them
(dataset, split, image size, crop, and a hash of the weights file's content), so later
evaluations only embed the samples. KID
and precision/recall (`metrics.feature_metrics`) need the features themselves, not only their
mean and covariance: the reference pass then also stores them (`<key>_pool3.npy`, float32, 8 kB
per example: 410 MB for CIFAR-10's 50k training images), computed once like the statistics.

On many hosts each process embeds only its own contiguous share of the samples (and its own eval
batches of the reference split), sharded over its local devices; nothing but float64 sums
crosses processes: `[n, sum x]`, then the scatter matrix about the global mean (Chan et al.,
1979) for FID, and per-part class-probability and KL sums for IS (`fid.inception_score_of_share`).
KID and precision/recall need every feature on one host: the float32 rows are gathered
(`gather_rows`) and every process computes the same numbers.
"""

import hashlib

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
from scipy import special

from ddpm_jax.config import validation
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import images
from ddpm_jax.metrics import feature_metrics
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception

_FEATURE_BATCH = 200  # images per Inception call on one process (rounded to its local devices)
_REDUCE_ROWS = 256  # rows of a [D, D] sum gathered at a time: bounds host memory to P x 4 MB
_IS_SPLITS = 10
_GATHER_BYTES = 64 << 20  # bytes of rows one process sends per gather
# The metrics on Inception features ("fid" gives the Inception score as well).
INCEPTION_METRICS = validation.INCEPTION_METRICS
_NEEDS_FEATURES = ("kid", "precision_recall")


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The float64 sum of `x` over every process, bit-identical on all of them.

  JAX arrays are float32 unless x64 is on (and TPUs have no float64), so the float64 bytes are
  gathered as uint32 pairs and summed on the host in process order; a [D, D] matrix goes
  `_REDUCE_ROWS` rows at a time.
  """
  x = np.ascontiguousarray(x, np.float64)
  if jax.process_count() == 1:
    return x
  flat = x.reshape(-1)
  step = _REDUCE_ROWS * (x.shape[-1] if x.ndim > 1 else 1)
  out = np.empty_like(flat)
  for start in range(0, flat.size, step):
    chunk = flat[start:start + step].view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(chunk))  # [P, 2 * len]
    out[start:start + step] = np.ascontiguousarray(gathered).view(np.float64).sum(axis=0)
  return out.reshape(x.shape)


def gather_rows(x: np.ndarray | None, allgather=None) -> np.ndarray:
  """Every process's rows of `x` [n_p, D] (None or [0, D]: none), concatenated in process order.

  Shares may differ in length (they are padded to the longest and cut after the gather), and go
  `_GATHER_BYTES` at a time. `allgather` stacks an array over processes (default:
  `multihost_utils.process_allgather`; with one process and no `allgather`, `x` is returned).
  """
  if allgather is None:
    if jax.process_count() == 1:
      return np.asarray(x)
    allgather = multihost_utils.process_allgather
  n, dim = (0, 0) if x is None else np.shape(x)
  sizes = np.asarray(allgather(np.array([n, dim], np.int32)))  # [P, 2]
  dim = int(sizes[:, 1].max())
  x = np.zeros((0, dim), np.float32) if x is None else np.asarray(x, np.float32)
  most = int(sizes[:, 0].max())
  x = np.concatenate([x, np.zeros((most - n, dim), np.float32)])
  step = max(1, _GATHER_BYTES // (4 * max(dim, 1)))
  chunks = [np.asarray(allgather(x[i:i + step])) for i in range(0, most, step)]  # [P, c, D]
  stacked = np.concatenate(chunks, axis=1) if chunks else np.zeros((len(sizes), 0, dim))
  return np.concatenate([stacked[p, :int(c)] for p, c in enumerate(sizes[:, 0])])


def gather_in_order(x: np.ndarray | None, index: np.ndarray) -> np.ndarray:
  """Every process's rows of `x` [n_p, D] (float32), ordered by their global `index` [n_p]: what
  one process holding every row has, whatever the processes' shares."""
  tagged = None if x is None or not len(x) else np.concatenate(
      [np.asarray(x, np.float32), index[:, None].astype(np.float32)], axis=1)
  gathered = gather_rows(tagged)  # float32 holds the indices exactly below 2^24
  return gathered[np.argsort(gathered[:, -1], kind="stable"), :-1]


def stats_cache_key(config) -> str:
  """`<dataset>_<split>_<size>_crop<c>_<weights sha256[:12]>`: whatever changes the statistics."""
  d = config.data
  spec = input_pipeline.DATASETS.get(d.dataset)
  crop = "none" if spec is None or spec.crop is None else spec.crop
  digest = hashlib.sha256()
  with epath.Path(config.eval.inception_weights).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  split = config.eval.fid_split.replace("/", "-").replace(":", "-").replace("%", "pc")
  return f"{d.dataset}_{split}_{d.image_size}_crop{crop}_{digest.hexdigest()[:12]}"


def _local_embedder(feature_fn):
  """`fn(uint8 [n, H, W, C]) -> {pool3, logits}` as float64 NumPy, on this host's devices.

  Rows are padded to a multiple of the local device count and sharded over a 1-D mesh of the
  local devices; grey images are repeated to RGB, as Inception expects.
  """
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)),
                                        jax.sharding.PartitionSpec("data"))

  def fn(batch):
    batch = np.asarray(batch)
    if batch.shape[-1] == 1:
      batch = np.repeat(batch, 3, axis=-1)
    n = len(batch)
    padded = -(-n // len(devices)) * len(devices)
    if padded > n:
      batch = np.concatenate([batch, np.repeat(batch[-1:], padded - n, axis=0)])
    out = feature_fn(jax.device_put(batch, sharding))
    return {k: np.asarray(v, np.float64)[:n] for k, v in out.items()}
  return fn


def reference_stats(config, workdir: str, embed) -> fid.FeatureStats:
  """pool3 statistics of every example of `config.eval.fid_split`, cached as .npz."""
  return reference(config, workdir, embed, features=False)[0]


def reference(config, workdir: str, embed, *, features: bool
              ) -> tuple[fid.FeatureStats, np.ndarray | None]:
  """pool3 statistics of every example of `config.eval.fid_split` (cached as .npz) and, when
  `features`, the float32 [N, 2048] features themselves (cached as `<key>_pool3.npy`).

  Each process embeds its own eval batches; the statistics are merged across processes and the
  features gathered (`gather_rows`), in process order. One pass fills whichever file is missing;
  a statistics file already there (possibly one published for pytorch-fid / TTUR) is kept.
  """
  d = config.data
  cache_dir = epath.Path(config.eval.fid_stats_dir or epath.Path(workdir) / "fid_stats")
  key = stats_cache_key(config)
  path, feats_path = cache_dir / f"{key}.npz", cache_dir / f"{key}_pool3.npy"
  have = np.array([path.exists(), not features or feats_path.exists()])
  if jax.process_count() > 1:
    # Every process must take the same branches: they hold collectives.
    have = np.all(multihost_utils.process_allgather(have), axis=0)
  have_stats, have_feats = bool(have[0]), bool(have[1])
  stats = all_feats = None
  if have_stats:
    with path.open("rb") as f:
      stats = fid.FeatureStats.load(f)
  if have_feats and features:
    with feats_path.open("rb") as f:
      all_feats = np.load(f)
  if have_stats and have_feats:
    return stats, all_feats
  acc, local = fid.FeatureStatsAccumulator(), []
  for batch in input_pipeline.create_eval_iterator(config, split=config.eval.fid_split):
    feats = embed(images.to_uint8(batch["image"]))["pool3"]
    feats = feats[np.asarray(batch["mask"]).reshape(-1)]
    if not have_stats:
      acc.update(feats)
    if not have_feats:
      local.append(feats.astype(np.float32))
  if not have_stats:
    stats = acc.merged(sum_over_processes)
  if not have_feats:
    all_feats = gather_rows(np.concatenate(local) if local else None)
  logging.info("Reference %s over all %d examples of %s/%s.",
               " and ".join(w for w, new in [("statistics", not have_stats),
                                             ("features", not have_feats)] if new),
               stats.n if not have_stats else len(all_feats), d.dataset, config.eval.fid_split)
  if jax.process_index() == 0:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not have_feats:
      # Written aside and renamed: a run killed mid-write leaves no truncated cache behind.
      tmp = cache_dir / f"{key}_pool3.tmp.npy"
      with tmp.open("wb") as f:
        np.save(f, all_feats)
      tmp.replace(feats_path)
    if not have_stats:
      with path.open("wb") as f:
        stats.save(f)
  return stats, all_feats


def local_share(num: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous share of `num` rows (sizes differ by <= 1)."""
  p, count = jax.process_index(), jax.process_count()
  return p * num // count, (p + 1) * num // count


def fid_and_is(config, workdir: str, samples_uint8: np.ndarray) -> dict:
  """FID (against the full reference split) and IS of uint8 samples [N, H, W, C]."""
  return make_evaluator(config, workdir, ("fid",))(samples_uint8)


def make_evaluator(config, workdir: str, metrics=("fid",)):
  """Loads Inception and the reference once; returns `fn(samples_uint8) -> report`.

  Args:
    config: reads `eval` (the reference split, weights, cache and each metric's options) and
      `data` (the reference split's images).
    workdir: the run's workdir (the default cache is <workdir>/fid_stats).
    metrics: the `INCEPTION_METRICS` to compute (others are ignored): 'fid' (FID and IS), 'kid'
      and 'precision_recall'.

  `fn(samples)` takes every sample, [N, H, W, C] uint8 (as `generation.draw_samples` returns
  them), and this process embeds only rows `local_share(N)`; `fn(samples, index, total)` takes
  this process's own samples with their indices among `total` (as
  `generation.draw_local_samples` returns them), so no host holds every sample. The report is
  the same either way (KID/P-R features are put in index order). It can run once per seed.
  """
  metrics = [m for m in INCEPTION_METRICS if m in metrics]
  need_features = any(m in _NEEDS_FEATURES for m in metrics)
  variables = inception.load_inception_params(config.eval.inception_weights)
  embed = _local_embedder(inception.make_inception_fn(variables))
  ref, ref_feats = reference(config, workdir, embed, features=need_features)
  e = config.eval

  def evaluate(samples_uint8: np.ndarray, index=None, total: int | None = None) -> dict:
    if index is None:
      total = len(samples_uint8)
      start, stop = local_share(total)
      rows, index = samples_uint8[start:stop], np.arange(start, stop)
    else:
      rows, index, total = samples_uint8, np.asarray(index, np.int64), int(total)
    acc, probs, local = fid.FeatureStatsAccumulator(), [], []
    for i in range(0, len(rows), _FEATURE_BATCH):
      feats = embed(rows[i:i + _FEATURE_BATCH])
      if "fid" in metrics:
        acc.update(feats["pool3"])
        probs.append(special.softmax(feats["logits"], axis=-1))
      if need_features:
        local.append(feats["pool3"].astype(np.float32))
    report = {}
    if "fid" in metrics:
      report.update(_fid_and_is(acc, probs, ref, index, total))
    report.update({"fid_reference_split": e.fid_split, "fid_reference_examples": ref.n,
                   "fid_num_samples": total})
    if need_features:  # every process's features, in index order (as one process has them)
      fake = gather_in_order(np.concatenate(local) if local else None, index)
    if "kid" in metrics:
      report.update(feature_metrics.kernel_inception_distance(
          ref_feats, fake, num_subsets=e.kid_num_subsets, subset_size=e.kid_subset_size))
    if "precision_recall" in metrics:
      report.update(feature_metrics.precision_recall(ref_feats, fake, k=e.pr_k,
                                                     max_features=e.pr_num_features))
    logging.info("%s", summary(report))
    return report
  return evaluate


def _fid_and_is(acc, probs, ref: fid.FeatureStats, index: np.ndarray, total: int) -> dict:
  """FID against `ref` and IS, from this process's accumulated share (global rows `index`)."""
  ours = acc.merged(sum_over_processes)
  # A process with no share (fewer samples than processes) still needs K for the reductions.
  has, k = (1.0, probs[0].shape[1]) if probs else (0.0, 0)
  has_total, k_total = sum_over_processes(np.array([has, has * k]))
  probs = np.concatenate(probs) if probs else np.zeros((0, int(round(k_total / has_total))))
  is_mean, is_std = fid.inception_score_of_share(probs, 0, total, min(_IS_SPLITS, total),
                                                 sum_over_processes, indices=index)
  return {"fid": fid.frechet_distance_from_stats(ours, ref), "inception_score": is_mean,
          "inception_score_std": is_std}


def summary(report: dict) -> str:
  """One line of the Inception metrics in `report`, e.g. for the log."""
  parts = []
  if "fid" in report:
    parts.append(f"FID {report['fid']:.3f}, IS {report['inception_score']:.2f} "
                 f"+- {report['inception_score_std']:.2f}")
  if "kid" in report:
    parts.append(f"KID {report['kid']:.3e} +- {report['kid_std']:.1e} "
                 f"({report['kid_subsets']} subsets of {report['kid_subset_size']})")
  if "precision" in report:
    parts.append(f"precision {report['precision']:.4f}, recall {report['recall']:.4f} "
                 f"(k={report['pr_k']}, {report['pr_num_fake']} generated vs "
                 f"{report['pr_num_real']} real)")
  return (f"{'; '.join(parts)}: {report['fid_num_samples']} samples against "
          f"{report['fid_reference_examples']} examples of {report['fid_reference_split']}.")
