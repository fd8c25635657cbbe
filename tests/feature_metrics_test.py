"""Tests of KID and improved precision/recall (ddpm_jax.metrics.feature_metrics), of their place
in the evaluation (fid_eval's reference-feature cache, the quality report, eval.num_seeds) and of
their config checks.

The metrics are checked against closed forms on small feature sets: point masses, identical and
far-apart sets, the pairwise definition of the unbiased MMD, 1-D nearest neighbours by hand, and a
brute-force float64 precision/recall. The evaluation runs on the digits test split with a fixed
random projection of the pixels standing in for Inception (as tests/drivers_test.py does), and a
sampler that draws uniform noise from its seed, so no model is built.
"""

import json

import jax
import numpy as np
import pytest

from ddpm_jax.config import validation
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import fid_eval
from ddpm_jax.evaluation import quality
from ddpm_jax.metrics import feature_metrics as fm
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception

from helpers import FakeInception
from helpers import tiny_config

# --------------------------------------------------------------------------------------------
# KID


def _kernel(a, b):
  return (np.dot(a, b) / len(a) + 1.0) ** 3


def _mmd2_by_pairs(x, y):
  """The unbiased MMD^2 written pair by pair, in float64."""
  m, n = len(x), len(y)
  xx = sum(_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(_kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
  xy = sum(_kernel(x[i], y[j]) for i in range(m) for j in range(n))
  return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2 * xy / (m * n)


def test_mmd2_equals_its_pairwise_definition():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 1.5, size=(9, 5))
  assert fm.mmd2_unbiased(x, y) == pytest.approx(_mmd2_by_pairs(x, y), rel=1e-12)


def test_kid_of_point_masses_is_the_kernel_distance():
  a, b = np.full(4, 0.5), np.array([1.0, -2.0, 0.0, 2.0])
  real, fake = np.tile(a, (50, 1)), np.tile(b, (40, 1))
  # Every pair of a point mass has the same kernel value: MMD^2_u = k(a,a) + k(b,b) - 2 k(a,b),
  # with a.a / 4 = 0.25, b.b / 4 = 2.25 and a.b / 4 = 0.125.
  expected = 1.25 ** 3 + 3.25 ** 3 - 2 * 1.125 ** 3
  kid = fm.kernel_inception_distance(real, fake, num_subsets=5, subset_size=30)
  assert kid["kid"] == pytest.approx(expected, rel=1e-12)
  assert kid["kid_std"] == pytest.approx(0.0, abs=1e-9)
  assert kid["kid_subset_size"] == 30 and kid["kid_subsets"] == 5
  # The same point mass on both sides: exactly nothing to tell apart.
  assert fm.kernel_inception_distance(real, real[:40], num_subsets=3)["kid"] == pytest.approx(
      0.0, abs=1e-12)


def test_kid_of_whole_sets_is_their_mmd():
  """Subsets as large as both sets are permutations of them, which leave the estimate as is."""
  rng = np.random.default_rng(1)
  real, fake = rng.normal(size=(30, 6)), rng.normal(0.3, 1.0, size=(30, 6))
  kid = fm.kernel_inception_distance(real, fake, num_subsets=4, subset_size=1000)
  assert kid["kid_subset_size"] == 30
  assert kid["kid"] == pytest.approx(_mmd2_by_pairs(fake, real), rel=1e-10)
  assert kid["kid_std"] < 1e-10 * abs(kid["kid"])


def test_kid_of_identical_sets_is_unbiased():
  """real = fake: subsets of the two are independent draws from one pool of n rows, so the
  estimate's expectation is 2 (S_off / (n (n - 1)) - S / n^2) with S the sum of all kernel
  values of the pool, S_off the sum off the diagonal: -2/n of (mean self-kernel - mean other
  kernel), near 0 and far below KID of a shifted set. A biased estimator (diagonal kept) would
  sit at +2 (mean self - mean other) / m instead, dozens of standard errors away."""
  rng = np.random.default_rng(2)
  n, m, subsets = 200, 50, 400
  pool = rng.normal(size=(n, 8))
  k = fm.polynomial_kernel(pool, pool)
  expected = 2 * ((k.sum() - np.trace(k)) / (n * (n - 1)) - k.sum() / n**2)
  kid = fm.kernel_inception_distance(pool, pool, num_subsets=subsets, subset_size=m)
  assert abs(kid["kid"] - expected) < 4 * kid["kid_std"] / np.sqrt(subsets)
  shifted = fm.kernel_inception_distance(pool, pool + 1.0, num_subsets=20, subset_size=m)
  assert abs(kid["kid"]) < 0.02 * shifted["kid"]


def test_kid_is_seeded():
  rng = np.random.default_rng(3)
  real, fake = rng.normal(size=(60, 4)), rng.normal(size=(70, 4))
  first = fm.kernel_inception_distance(real, fake, num_subsets=3, subset_size=20, seed=5)
  assert first == fm.kernel_inception_distance(real, fake, num_subsets=3, subset_size=20, seed=5)
  assert first != fm.kernel_inception_distance(real, fake, num_subsets=3, subset_size=20, seed=6)


def test_kid_rejects_bad_input():
  with pytest.raises(ValueError, match="at least 2|subsets of >= 2"):
    fm.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    fm.kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# --------------------------------------------------------------------------------------------
# Precision and recall


def _pr_brute_force(real, fake, k):
  """Kynkaanniemi et al. (2019), eqs. 1-3, on full float64 distance matrices."""
  def dists(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  r_real = np.sort(dists(real, real), axis=1)[:, k]  # column 0 is the point itself
  r_fake = np.sort(dists(fake, fake), axis=1)[:, k]
  d = dists(fake, real)
  precision = np.mean((d <= r_real[None, :]).any(axis=1))
  recall = np.mean((d.T <= r_fake[None, :]).any(axis=1))
  return precision, recall


def test_precision_recall_of_identical_sets_are_one():
  feats = np.random.default_rng(4).normal(size=(64, 16))
  out = fm.precision_recall(feats, feats.copy(), batch_size=24)
  assert (out["precision"], out["recall"]) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_are_zero():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(64, 16))  # the shapes of the test above: nothing new to compile
  fake = rng.normal(size=(64, 16)) + 100.0
  out = fm.precision_recall(real, fake, batch_size=24)
  assert (out["precision"], out["recall"]) == (0.0, 0.0)
  assert (out["pr_num_real"], out["pr_num_fake"], out["pr_k"]) == (64, 64, 3)


def test_precision_recall_by_hand_in_one_dimension():
  # Real points 0..4 with k = 1: each ball has radius 1 (the nearest other point), so the real
  # manifold is [-1, 5]; 0.5 is inside, 10 outside: precision 1/2. The fake balls have radius
  # 9.5 (each other's distance) and cover every real point: recall 1.
  real = np.arange(5.0)[:, None]
  fake = np.array([[0.5], [10.0]])
  out = fm.precision_recall(real, fake, k=1)
  assert (out["precision"], out["recall"]) == (0.5, 1.0)
  # 5 lies exactly on the ball of 4 (radius 1): on the boundary counts as inside (eq. 1's <=).
  assert fm.precision_recall(real, np.array([[0.5], [10.0], [5.0]]), k=1)["precision"] == 2 / 3
  # With k = 3 the real radii are 3 (at 0 and 4) or 2, so the real manifold is [-3, 7]: 0.5 and
  # 6.9 are inside, 7.2 and 10 outside. The fake ball around 0.5 (radius 9.5) covers every real.
  fake = np.array([[0.5], [6.9], [7.2], [10.0]])
  assert (fm.precision_recall(real, fake, k=3)["precision"],
          fm.precision_recall(real, fake, k=1)["precision"]) == (0.5, 0.25)
  assert fm.precision_recall(real, fake, k=3)["recall"] == 1.0


@pytest.mark.parametrize("batch_size", [7, 500])  # blocks that do not divide N; one block
@pytest.mark.parametrize("k", [1, 3])
def test_batched_precision_recall_equals_brute_force(batch_size, k):
  rng = np.random.default_rng(6)
  # Overlapping laws, both far from the origin (as post-ReLU features are).
  real = rng.normal(size=(97, 6)) + 5.0
  fake = rng.normal(0.6, 1.3, size=(83, 6)) + 5.0
  expected = _pr_brute_force(real, fake, k)
  assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a case that tells things apart
  out = fm.precision_recall(real, fake, k=k, batch_size=batch_size)
  assert (out["precision"], out["recall"]) == pytest.approx(expected, abs=1e-12)


def test_knn_radii_equal_sorted_distances():
  feats = np.random.default_rng(7).normal(size=(45, 5)).astype(np.float32)
  d2 = ((feats[:, None].astype(np.float64) - feats[None]) ** 2).sum(-1)
  radii = fm.knn_sq_radii(feats, 3, batch_size=16)
  np.testing.assert_allclose(radii, np.sort(d2, axis=1)[:, 3], rtol=1e-4)


def test_precision_recall_subsample_max_features():
  rng = np.random.default_rng(8)
  real, fake = rng.normal(size=(90, 4)), rng.normal(size=(30, 4))
  out = fm.precision_recall(real, fake, max_features=40)
  assert (out["pr_num_real"], out["pr_num_fake"]) == (40, 30)
  with pytest.raises(ValueError, match="more than k"):
    fm.precision_recall(real, fake[:3], k=3)


# --------------------------------------------------------------------------------------------
# Gathering features over processes


def test_gather_rows_concatenates_uneven_shares_in_process_order(monkeypatch):
  """Four threads stand in for processes; one holds no rows. Small chunks force many gathers."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fid_eval, "_GATHER_BYTES", 3 * 5 * 4)  # 3 rows of 5 float32 per gather
  feats = np.random.default_rng(9).normal(size=(23, 5)).astype(np.float32)
  shares = [feats[:10], None, feats[10:11], feats[11:]]
  barrier, slots = threading.Barrier(len(shares)), [None] * len(shares)

  def run(rank):
    def allgather(x):
      slots[rank] = np.asarray(x)
      barrier.wait()
      out = np.stack(slots)
      barrier.wait()
      return out
    return fid_eval.gather_rows(shares[rank], allgather)

  with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
    results = list(pool.map(run, range(len(shares))))
  for out in results:
    np.testing.assert_array_equal(out, feats)


# --------------------------------------------------------------------------------------------
# The evaluation: reference features, the report, eval.num_seeds

TEST_SPLIT_SIZE = 360
FEATURE_DIM = 8


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
  """(config, fake feature fn): the digits test split as reference, Inception swapped out."""
  weights = tmp_path / "inception_fid.npz"
  np.savez(weights, dummy=np.zeros(1))
  feature_fn = FakeInception(FEATURE_DIM)
  monkeypatch.setattr(inception, "load_inception_params", lambda path: {"params": {}})
  monkeypatch.setattr(inception, "make_inception_fn", lambda variables: feature_fn)
  config = tiny_config(**{
      "eval.metrics": ("fid", "kid", "precision_recall"), "eval.fid_split": "test",
      "eval.inception_weights": str(weights), "eval.fid_stats_dir": str(tmp_path / "fid_stats"),
      "eval.batch_size": 48, "eval.kid_num_subsets": 10, "eval.kid_subset_size": 100,
      "sampling.num_samples": 60, "sampling.batch_size": 32, "sampling.seed": 11})
  return config, feature_fn


def test_reference_features_are_cached_with_the_stats(tmp_path, fake_inception):
  config, feature_fn = fake_inception
  real = input_pipeline.load_digits_arrays("test")[0]
  evaluate = fid_eval.make_evaluator(config, str(tmp_path), config.eval.metrics)
  key = fid_eval.stats_cache_key(config)
  cached = np.load(tmp_path / "fid_stats" / f"{key}_pool3.npy")
  assert cached.dtype == np.float32 and cached.shape == (TEST_SPLIT_SIZE, FEATURE_DIM)
  np.testing.assert_allclose(cached, feature_fn(np.repeat(real, 3, axis=-1))["pool3"], rtol=1e-6)

  # The split against itself: both manifolds hold every point, KID sits at its ~0 floor.
  same = evaluate(real)
  assert (same["precision"], same["recall"]) == (1.0, 1.0)
  noise = np.random.default_rng(1).integers(0, 256, real.shape, dtype=np.uint8)
  noisy = evaluate(noise)
  assert abs(same["kid"]) < 0.01 * noisy["kid"]
  assert noisy["precision"] < 0.5 and noisy["kid_subset_size"] == 100

  # The samples a process holds, in any order, with their indices: the same report, IS and the
  # subset-drawn KID included (features are put back in index order).
  config.eval.metrics = ("fid", "kid", "precision_recall")
  evaluate_all = fid_eval.make_evaluator(config, str(tmp_path), config.eval.metrics)
  order = np.random.default_rng(2).permutation(len(noise))
  shuffled, whole = evaluate_all(noise[order], order, len(noise)), evaluate_all(noise)
  assert shuffled.keys() == whole.keys()
  for key, value in whole.items():  # FID and IS sum in another order: float rounding only
    assert shuffled[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float)
                             else value), key

  # A later evaluation embeds only the samples.
  calls = feature_fn.calls
  again = fid_eval.make_evaluator(config, str(tmp_path), config.eval.metrics)(real)
  assert feature_fn.calls == calls + 2  # 360 samples in batches of 200
  assert again == same


def test_features_are_added_to_a_cache_of_stats_alone(tmp_path, fake_inception):
  """A cache written for FID holds only the statistics; asking for KID later embeds the split
  once more and adds the features, but keeps the statistics file (it may be a published one)."""
  config, feature_fn = fake_inception
  real = input_pipeline.load_digits_arrays("test")[0]
  fid_eval.fid_and_is(config, str(tmp_path), real)
  key = fid_eval.stats_cache_key(config)
  stats_path = tmp_path / "fid_stats" / f"{key}.npz"
  feats_path = tmp_path / "fid_stats" / f"{key}_pool3.npy"
  assert not feats_path.exists()
  stats = fid.FeatureStats.load(stats_path)
  fid.FeatureStats(stats.mu + 1.0, stats.sigma, 0).save(stats_path)  # as another tool's file
  before = stats_path.read_bytes()
  calls = feature_fn.calls
  report = fid_eval.make_evaluator(config, str(tmp_path), ("fid", "kid"))(real)
  assert feature_fn.calls == calls + 8 + 2  # the split in 8 batches of 48, then the samples
  assert np.load(feats_path).shape == (TEST_SPLIT_SIZE, FEATURE_DIM)
  assert stats_path.read_bytes() == before
  # FID of the split against statistics with the mean moved by 1 in each of the D dimensions.
  assert report["fid"] == pytest.approx(FEATURE_DIM, rel=1e-6)
  assert "kid" in report and "precision" not in report


class _NoiseSampler:
  """`fn(params, rng, n)` of the sampling service: uniform noise images drawn from `rng`."""

  def __call__(self, params, rng, n):
    return np.asarray(jax.random.uniform(rng, (n, 8, 8, 1), minval=-1.0, maxval=1.0)), None

  def compile(self, params, rng, n):
    pass

  def local(self, params, rng, n):  # one process: every sample is its own
    return self(params, rng, n)[0], np.arange(n), None


def _report(config, workdir):
  return quality.quality_report(config, str(workdir), None, None, None, None, 0,
                                sample_fn=_NoiseSampler())


def test_quality_report_writes_kid_and_precision_recall(tmp_path, fake_inception):
  config, _ = fake_inception
  config.eval.metrics = ("kid", "precision_recall")  # without FID
  report = _report(config, tmp_path)
  written = json.loads((tmp_path / "eval" / "step_0.json").read_text())
  for key in ("kid", "kid_std", "precision", "recall"):
    assert np.isfinite(report[key]) and written[key] == pytest.approx(report[key]), key
  assert "fid" not in report and "inception_score" not in report
  assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
  assert report["pr_num_fake"] == 60 and report["pr_num_real"] == TEST_SPLIT_SIZE
  assert report["num_samples"] == 60
  assert not any(k.endswith("_per_seed") for k in report)  # one seed: the report as before


def test_num_seeds_reports_each_seed_and_min_and_mean(tmp_path, fake_inception):
  config, _ = fake_inception
  config.eval.num_seeds = 3
  report = _report(config, tmp_path / "three")
  assert report["eval_seeds"] == [11, 12, 13]
  fids = report["fid_per_seed"]
  assert len(set(fids)) == 3 and report["fid"] == fids[0]
  assert min(fids) < fids[0]  # the first seed's is not the minimum: fid_min tells them apart
  assert report["fid_min"] == min(fids) and report["fid_mean"] == pytest.approx(np.mean(fids))
  for key in ("kid", "precision", "recall", "inception_score"):
    assert len(report[f"{key}_per_seed"]) == 3 and report[key] == report[f"{key}_per_seed"][0]
  # Seed i's set is exactly what a one-seed evaluation with sampling.seed + i draws.
  config.eval.num_seeds = 1
  config.sampling.seed = 13
  single = _report(config, tmp_path / "one")
  assert single["fid"] == pytest.approx(fids[2], rel=1e-12)
  assert single["kid"] == pytest.approx(report["kid_per_seed"][2], rel=1e-12)


# --------------------------------------------------------------------------------------------
# Config checks


@pytest.mark.parametrize("overrides, match", [
    ({"eval.metrics": ("fid", "lpips")}, r"eval metric 'lpips'.*precision_recall"),
    ({"eval.num_seeds": 0}, r"eval.num_seeds must be >= 1"),
    ({"eval.metrics": ("kid",), "eval.kid_subset_size": 1}, r"kid_subset_size >= 2"),
    ({"eval.metrics": ("precision_recall",), "eval.pr_k": 0}, r"eval.pr_k must be >= 1"),
    ({"eval.metrics": ("precision_recall",), "sampling.num_samples": 3},
     r"more than 3 features per set"),
])
def test_bad_eval_options_fail_with_the_fix(overrides, match):
  config = tiny_config(**overrides)
  with pytest.raises(ValueError, match=match):
    validation.validate(config, mode="eval", open_data=False)


def test_new_metrics_pass_validation():
  config = tiny_config(**{"eval.metrics": ("fid", "kid", "precision_recall"),
                          "eval.num_seeds": 3})
  validation.validate(config, mode="eval", open_data=False)
