"""Tests for ddpm_jax.metrics.fid: Fréchet distance, feature stats, IS."""

import numpy as np
import pytest
from scipy import linalg

from ddpm_jax.metrics import fid


def _reference_fd(x1, x2):
  """Independent FD via eigenvalues: Tr sqrt(S1 S2) = sum_i sqrt(lambda_i).

  S1 S2 is similar to S1^{1/2} S2 S1^{1/2} (PSD), so its eigenvalues are real
  and non-negative; np.linalg.eigvals returns them with round-off imaginary
  parts, which are dropped.
  """
  mu1, mu2 = x1.mean(0), x2.mean(0)
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  lam = np.linalg.eigvals(s1 @ s2).real
  tr_sqrt = np.sqrt(np.clip(lam, 0.0, None)).sum()
  return np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


def _correlated(rng, n, d, scale=1.0, shift=0.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return scale * rng.normal(size=(n, d)) @ mix + shift


def test_fid_of_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  x = _correlated(rng, 500, 32, scale=3.0, shift=5.0)
  stats = fid.FeatureStats.from_features(x)
  value = fid.frechet_distance_from_stats(stats, stats)
  assert abs(value) < 1e-6 * np.trace(stats.sigma)


def test_fid_matches_eigenvalue_reference():
  rng = np.random.default_rng(1)
  x1 = _correlated(rng, 400, 24)
  x2 = _correlated(rng, 300, 24, scale=1.5, shift=0.3)
  s1 = fid.FeatureStats.from_features(x1)
  s2 = fid.FeatureStats.from_features(x2)
  np.testing.assert_allclose(s1.mu, x1.mean(0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(s1.sigma, np.cov(x1, rowvar=False), atol=1e-12)
  value = fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
  np.testing.assert_allclose(value, _reference_fd(x1, x2), rtol=1e-8)
  # Symmetric in its arguments.
  np.testing.assert_allclose(
      fid.frechet_distance_from_stats(s2, s1), value, rtol=1e-8)


def test_streaming_stats_equal_one_shot():
  rng = np.random.default_rng(2)
  # A large common offset is where a naive sum-of-squares loses digits.
  x = _correlated(rng, 1001, 16, shift=100.0).astype(np.float32)
  one_shot = fid.FeatureStats.from_features(x)
  acc = fid.FeatureStatsAccumulator()
  for batch in np.array_split(x, [7, 7, 300, 650]):  # Uneven, one empty.
    acc.update(batch)
  streamed = acc.result()
  assert streamed.n == one_shot.n == 1001
  np.testing.assert_allclose(streamed.mu, one_shot.mu, rtol=1e-12)
  np.testing.assert_allclose(streamed.sigma, one_shot.sigma, atol=1e-10)
  np.testing.assert_allclose(
      one_shot.sigma, np.cov(x.astype(np.float64), rowvar=False), atol=1e-9)


def test_fid_of_shifted_gaussians_approaches_closed_form():
  # For N(0, I) vs N(m, I) the exact FD is ||m||^2; finite-n covariance
  # noise adds a positive bias of order d^2 / n.
  rng = np.random.default_rng(3)
  d, n = 8, 200_000
  m = rng.normal(size=d)
  x1 = rng.normal(size=(n, d))
  x2 = rng.normal(size=(n, d)) + m
  value = fid.frechet_distance_from_stats(
      fid.FeatureStats.from_features(x1), fid.FeatureStats.from_features(x2))
  np.testing.assert_allclose(value, np.sum(m**2), atol=5e-3 * np.sum(m**2))


def test_singular_covariance_stays_finite():
  # Fewer samples than dims: rank-deficient covariances, as with small evals.
  rng = np.random.default_rng(4)
  x1 = rng.normal(size=(10, 32))
  x2 = rng.normal(size=(10, 32))
  s1 = fid.FeatureStats.from_features(x1)
  s2 = fid.FeatureStats.from_features(x2)
  value = fid.frechet_distance_from_stats(s1, s2)
  assert np.isfinite(value)
  np.testing.assert_allclose(value, _reference_fd(x1, x2), rtol=1e-3)


def test_fid_matches_ttur_schur_sqrtm_on_full_rank_covariances():
  """TTUR / pytorch-fid's formula, Tr sqrtm(S1 S2) by a Schur square root, gives the same value
  to float rounding where it is well defined (full rank): |d| ~ 1e-12 relative in float64 for
  d = 24, so rtol 1e-9 leaves three decades of margin."""
  rng = np.random.default_rng(6)
  x1 = _correlated(rng, 400, 24)
  x2 = _correlated(rng, 300, 24, scale=0.7, shift=-0.2)
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  ttur = (np.sum((x1.mean(0) - x2.mean(0))**2) + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)
  value = fid.frechet_distance(x1.mean(0), s1, x2.mean(0), s2)
  np.testing.assert_allclose(value, ttur, rtol=1e-9)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="shape"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_npz_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  stats = fid.FeatureStats.from_features(rng.normal(size=(50, 6)))
  path = tmp_path / "stats.npz"
  stats.save(path)
  loaded = fid.FeatureStats.load(path)
  assert loaded.n == 50
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  # pytorch-fid / TTUR files carry only mu and sigma.
  np.savez(tmp_path / "ttur.npz", mu=stats.mu, sigma=stats.sigma)
  assert fid.FeatureStats.load(tmp_path / "ttur.npz").n == 0


@pytest.mark.parametrize("num_classes", [2, 10, 1008])
def test_inception_score_of_uniform_one_hot_is_num_classes(num_classes):
  labels = np.arange(num_classes * 10) % num_classes
  probs = np.eye(num_classes)[labels]
  mean, std = fid.inception_score(probs, num_splits=10)
  np.testing.assert_allclose(mean, num_classes, rtol=1e-10)
  assert std < 1e-8


def test_inception_score_of_identical_predictions_is_one():
  rng = np.random.default_rng(6)
  logits = np.tile(rng.normal(size=(1, 10)), (100, 1))
  mean, std = fid.inception_score(logits, num_splits=5)
  np.testing.assert_allclose(mean, 1.0, atol=1e-12)
  assert std < 1e-12


def test_inception_score_logits_equal_probs():
  rng = np.random.default_rng(7)
  logits = 3.0 * rng.normal(size=(97, 10))  # 97: uneven splits.
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  from_logits = fid.inception_score(logits, num_splits=4)
  from_probs = fid.inception_score(probs, num_splits=4)
  np.testing.assert_allclose(from_logits, from_probs, rtol=1e-10)
  assert 1.0 < from_logits[0] < 10.0


def test_extract_features_keeps_every_row_with_one_batch_shape():
  seen_shapes = set()

  def fn(batch):
    seen_shapes.add(batch.shape)
    return {"double": 2 * batch, "sum": batch.sum(axis=1)}

  x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
  out = fid.extract_features(fn, x, batch_size=5)
  assert seen_shapes == {(5, 3)}
  np.testing.assert_array_equal(out["double"], 2 * x)
  np.testing.assert_array_equal(out["sum"], x.sum(axis=1))


def _on_processes(shares, fn):
  """Runs `fn(share, reduce_sum)` for each share on its own thread, as if on its own process:
  `reduce_sum` is an all-reduce (sum in share order) over the threads. Returns every result."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  barrier, slots = threading.Barrier(len(shares)), [None] * len(shares)

  def run(rank):
    def reduce_sum(x):
      slots[rank] = np.asarray(x, np.float64)
      barrier.wait()
      total = np.sum(np.stack(slots), axis=0)
      barrier.wait()  # nobody overwrites a slot before everyone has summed
      return total
    return fn(shares[rank], reduce_sum)

  with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
    return list(pool.map(run, range(len(shares))))


def test_stats_merged_over_processes_equal_one_shot():
  """Uneven shares (one empty) with large common offsets: the merge is exact, not shifted."""
  feats = _correlated(np.random.default_rng(0), 300, 16, shift=1e3)
  shares = [feats[:170], feats[170:170], feats[170:241], feats[241:]]

  def merged(share, reduce_sum):
    acc = fid.FeatureStatsAccumulator()
    for i in range(0, len(share), 50):
      acc.update(share[i:i + 50])
    return acc.merged(reduce_sum)

  expected = fid.FeatureStats.from_features(feats)
  for stats in _on_processes(shares, merged):
    assert stats.n == 300
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_splits", [1, 7, 10])
def test_inception_score_over_processes_equals_one_process(num_splits):
  logits = np.random.default_rng(1).normal(size=(53, 10)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  bounds = [0, 20, 20, 37, 53]  # process shares, one of them empty
  shares = [(probs[a:b], a) for a, b in zip(bounds[:-1], bounds[1:])]
  expected = fid.inception_score(probs, num_splits=num_splits)
  results = _on_processes(shares, lambda share, reduce_sum: fid.inception_score_of_share(
      share[0], share[1], 53, num_splits, reduce_sum))
  for mean, std in results:
    np.testing.assert_allclose([mean, std], expected, rtol=1e-12, atol=1e-12)
  assert expected[0] > 1.0
