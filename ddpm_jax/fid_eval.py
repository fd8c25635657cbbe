"""FID and Inception Score of samples against cached reference statistics of a full split.

Conventions (REFERENCE.md, "FID / IS conventions"): pool3 features of the FID Inception-v3
(TF 2015-12-05 weights, loaded from a local file), inputs as uint8 resized bilinearly to 299,
reference statistics over the *whole* `config.eval.fid_split` (the eval iterator drops no
example), cached per dataset/split/resolution so later evaluations only embed the samples.
"""


from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ddpm_jax import images
from ddpm_jax import input_pipeline
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception

_FEATURE_BATCH = 200


def check_inception_weights(config: ml_collections.ConfigDict) -> str:
  """The weights path, or a FileNotFoundError that says how to make the file."""
  path = config.eval.inception_weights
  if not path or not epath.Path(path).exists():
    raise FileNotFoundError(
        f"FID needs the Inception weights file (--config.eval.inception_weights={path!r} not "
        "found). Make it once on a machine with internet: download pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth, run `python tools/convert_inception_weights.py "
        "--pth pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz`, then pass "
        "--config.eval.inception_weights=inception_fid.npz. Or drop 'fid' from "
        "--config.eval.metrics.")
  return path


def reference_stats(config, workdir: str, feature_fn) -> fid.FeatureStats:
  """pool3 statistics of every example of `config.eval.fid_split`, cached as .npz."""
  d = config.data
  cache_dir = epath.Path(config.eval.fid_stats_dir or epath.Path(workdir) / "fid_stats")
  path = cache_dir / f"{d.dataset}_{config.eval.fid_split}_{d.image_size}.npz"
  cached = path.exists()
  if jax.process_count() > 1:
    # Every process must take the same branch: the other one holds collectives.
    cached = bool(np.all(multihost_utils.process_allgather(np.array(cached))))
  if cached:
    with path.open("rb") as f:
      return fid.FeatureStats.load(f)
  acc = fid.FeatureStatsAccumulator()
  for batch in input_pipeline.create_eval_iterator(config, split=config.eval.fid_split):
    local = feature_fn(images.to_uint8(batch["image"]))["pool3"]
    # Every process adds every process's real examples, so all hold the same statistics.
    feats = np.asarray(multihost_utils.process_allgather(np.asarray(local)))
    mask = np.asarray(multihost_utils.process_allgather(batch["mask"]))
    acc.update(feats.reshape(-1, feats.shape[-1])[mask.reshape(-1)])
  stats = acc.result()
  logging.info("Reference statistics over all %d examples of %s/%s.", stats.n, d.dataset,
               config.eval.fid_split)
  if jax.process_index() == 0:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      stats.save(f)
  return stats


def fid_and_is(config, workdir: str, samples_uint8: np.ndarray) -> dict:
  """FID (against the full reference split) and IS of uint8 samples [N, H, W, C]."""
  variables = inception.load_inception_params(check_inception_weights(config))
  feature_fn = inception.make_inception_fn(variables)
  if samples_uint8.shape[-1] == 1:  # grey datasets: Inception wants RGB
    samples_uint8 = np.repeat(samples_uint8, 3, axis=-1)
  ref = reference_stats(config, workdir, _rgb(feature_fn))
  feats = fid.extract_features(feature_fn, samples_uint8, batch_size=_FEATURE_BATCH)
  ours = fid.FeatureStats.from_features(feats["pool3"])
  is_mean, is_std = fid.inception_score(feats["logits"])
  return {"fid": fid.frechet_distance_from_stats(ours, ref), "inception_score": is_mean,
          "inception_score_std": is_std, "fid_reference_split": config.eval.fid_split,
          "fid_reference_examples": ref.n, "fid_num_samples": len(samples_uint8)}


def _rgb(feature_fn):
  def fn(x):
    return feature_fn(np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x)
  return fn
