"""FID and Inception Score of samples against cached reference statistics of a full split.

Conventions (REFERENCE.md, "FID / IS conventions"): pool3 features of the FID Inception-v3
(TF 2015-12-05 weights, loaded from a local file), inputs as uint8 resized bilinearly to 299,
reference statistics over the *whole* `config.eval.fid_split` (the eval iterator drops no
example), cached under a key of everything that changes them (dataset, split, image size, crop,
and a hash of the weights file's content), so later evaluations only embed the samples.

On many hosts each process embeds only its own contiguous share of the samples (and its own eval
batches of the reference split), sharded over its local devices; nothing but float64 sums
crosses processes: `[n, sum x]`, then the scatter matrix about the global mean (Chan et al.,
1979) for FID, and per-part class-probability and KL sums for IS (`fid.inception_score_of_share`).
"""

import hashlib

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
from scipy import special

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import images
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception

_FEATURE_BATCH = 200  # images per Inception call on one process (rounded to its local devices)
_REDUCE_ROWS = 256  # rows of a [D, D] sum gathered at a time: bounds host memory to P x 4 MB
_IS_SPLITS = 10


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
  """pool3 statistics of every example of `config.eval.fid_split`, cached as .npz.

  Each process embeds its own eval batches; the statistics are merged across processes.
  """
  d = config.data
  cache_dir = epath.Path(config.eval.fid_stats_dir or epath.Path(workdir) / "fid_stats")
  path = cache_dir / f"{stats_cache_key(config)}.npz"
  cached = path.exists()
  if jax.process_count() > 1:
    # Every process must take the same branch: the other one holds collectives.
    cached = bool(np.all(multihost_utils.process_allgather(np.array(cached))))
  if cached:
    with path.open("rb") as f:
      return fid.FeatureStats.load(f)
  acc = fid.FeatureStatsAccumulator()
  for batch in input_pipeline.create_eval_iterator(config, split=config.eval.fid_split):
    feats = embed(images.to_uint8(batch["image"]))["pool3"]
    acc.update(feats[np.asarray(batch["mask"]).reshape(-1)])
  stats = acc.merged(sum_over_processes)
  logging.info("Reference statistics over all %d examples of %s/%s.", stats.n, d.dataset,
               config.eval.fid_split)
  if jax.process_index() == 0:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      stats.save(f)
  return stats


def local_share(num: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous share of `num` rows (sizes differ by <= 1)."""
  p, count = jax.process_index(), jax.process_count()
  return p * num // count, (p + 1) * num // count


def fid_and_is(config, workdir: str, samples_uint8: np.ndarray) -> dict:
  """FID (against the full reference split) and IS of uint8 samples [N, H, W, C].

  `samples_uint8` holds every sample (as `generation.draw_samples` returns them); this process
  embeds only rows `local_share(N)`.
  """
  variables = inception.load_inception_params(config.eval.inception_weights)
  embed = _local_embedder(inception.make_inception_fn(variables))
  ref = reference_stats(config, workdir, embed)
  total = len(samples_uint8)
  start, stop = local_share(total)
  acc, probs = fid.FeatureStatsAccumulator(), []
  for i in range(start, stop, _FEATURE_BATCH):
    feats = embed(samples_uint8[i:min(i + _FEATURE_BATCH, stop)])
    acc.update(feats["pool3"])
    probs.append(special.softmax(feats["logits"], axis=-1))
  ours = acc.merged(sum_over_processes)
  # A process with no share (fewer samples than processes) still needs K for the reductions.
  has, k = (1.0, probs[0].shape[1]) if probs else (0.0, 0)
  has_total, k_total = sum_over_processes(np.array([has, has * k]))
  probs = np.concatenate(probs) if probs else np.zeros((0, int(round(k_total / has_total))))
  is_mean, is_std = fid.inception_score_of_share(probs, start, total,
                                                 min(_IS_SPLITS, total), sum_over_processes)
  return {"fid": fid.frechet_distance_from_stats(ours, ref), "inception_score": is_mean,
          "inception_score_std": is_std, "fid_reference_split": config.eval.fid_split,
          "fid_reference_examples": ref.n, "fid_num_samples": total}
