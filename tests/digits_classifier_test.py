"""Tests for ddpm_jax.metrics.digits_classifier (trains once, ~5 s on CPU)."""

import numpy as np
import pytest

from ddpm_jax.data.input_pipeline import load_digits_arrays
from ddpm_jax.metrics import digits_classifier as dc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_classifier"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
  return dc.get_digits_classifier(cache_dir)


@pytest.fixture(scope="module")
def test_split():
  return load_digits_arrays("test")


@pytest.fixture(scope="module")
def train_split():
  return load_digits_arrays("train")


@pytest.fixture(scope="module")
def real_scores(classifier, cache_dir, train_split):
  """Real train digits, scored as samples: what a model that copies its data gets."""
  del classifier  # Trained (and cached) first.
  return dc.digits_score(train_split[0][:500], cache_dir)


def test_held_out_accuracy(classifier, test_split):
  variables, accuracy = classifier
  assert accuracy > 0.9
  logits = dc.digits_features(variables, test_split[0])["logits"]
  np.testing.assert_allclose(
      np.mean(logits.argmax(-1) == test_split[1]), accuracy)


def test_feature_shapes(classifier, test_split):
  out = dc.digits_features(classifier[0], test_split[0][:5])
  assert out["features"].shape == (5, dc.FEATURE_DIM)
  assert out["logits"].shape == (5, dc.NUM_CLASSES)


def test_real_train_digits_score_near_the_floor(real_scores, train_split):
  # Both FDs use half of the 360 held-out digits, whatever the sample count.
  assert real_scores["fd_num_images"] == 180
  floor = real_scores["frechet_distance_floor"]
  assert 0 < floor < real_scores["frechet_distance"]
  # Real train digits come from other writers than the held-out ones: a bit
  # above the floor, and the separately reported train-real level.
  assert real_scores["frechet_distance"] < 2.0 * floor
  assert real_scores["frechet_distance"] == pytest.approx(
      real_scores["frechet_distance_train_real"], rel=0.15)
  assert real_scores["inception_score"] > 8.0
  assert real_scores["mean_confidence"] > 0.95
  assert real_scores["mean_confidence_real"] > 0.9
  hist = real_scores["class_histogram"]
  assert len(hist) == 10 and sum(hist) == 500
  # A >90%-accurate classifier sees roughly the true class balance.
  true_counts = np.bincount(train_split[1][:500], minlength=10)
  assert np.abs(np.asarray(hist) - true_counts).sum() < 0.1 * sum(hist)


def test_floor_is_taken_at_the_sample_count(real_scores, cache_dir,
                                            train_split):
  # FD is biased upwards by O(1/n): with 40 samples the floor is recomputed
  # on 40 held-out digits, and so is higher than at 180.
  few = dc.digits_score(train_split[0][:40], cache_dir)
  assert few["fd_num_images"] == 40
  assert few["frechet_distance_floor"] > real_scores["frechet_distance_floor"]
  assert few["frechet_distance"] < 2.0 * few["frechet_distance_floor"]


def test_real_beats_noise_and_shuffled_pixels(real_scores, cache_dir,
                                             train_split):
  rng = np.random.default_rng(0)
  images = train_split[0][:500]
  noise = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
  flat = images.reshape(len(images), -1)
  shuffled = np.take_along_axis(
      flat, rng.permuted(np.tile(np.arange(64), (len(images), 1)), axis=1),
      axis=1).reshape(images.shape)
  fd_real = real_scores["frechet_distance"]
  noise_scores = dc.digits_score(noise, cache_dir)
  fd_shuffled = dc.digits_score(shuffled, cache_dir)["frechet_distance"]
  assert fd_real < 0.25 * noise_scores["frechet_distance"]
  assert fd_real < 0.25 * fd_shuffled
  # The floor does not depend on the samples.
  assert noise_scores["frechet_distance_floor"] == pytest.approx(
      real_scores["frechet_distance_floor"], rel=1e-12)
  assert noise_scores["mean_confidence"] < real_scores["mean_confidence"]


def test_float_samples_are_quantised_like_uint8(real_scores, cache_dir,
                                                train_split):
  # u / 127.5 - 1 maps back to exactly u under the FID quantisation.
  as_float = train_split[0][:500].astype(np.float32) / 127.5 - 1.0
  scores = dc.digits_score(as_float[..., 0], cache_dir)  # No channel axis.
  assert scores == real_scores


def test_constant_images(cache_dir):
  constant = np.full((50, 8, 8, 1), -1.0, np.float32)
  scores = dc.digits_score(constant, cache_dir)
  assert scores["inception_score"] == pytest.approx(1.0, abs=1e-6)
  assert sorted(scores["class_histogram"]) == [0] * 9 + [50]
  assert np.isfinite(scores["frechet_distance"])
  assert scores["frechet_distance"] > 4 * scores["frechet_distance_floor"]
  with pytest.raises(ValueError, match="at least 2"):
    dc.digits_score(constant[:1], cache_dir)


def test_to_uint8():
  x = np.array([-1.5, -1.0, 0.0, 1.0, 1.2], np.float32)
  x = np.broadcast_to(x[:, None, None, None], (5, 8, 8, 1))
  np.testing.assert_array_equal(dc.to_uint8(x)[:, 0, 0, 0],
                                [0, 0, 128, 255, 255])
  u = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
  assert dc.to_uint8(u) is u
  with pytest.raises(ValueError, match="8, 8, 1"):
    dc.to_uint8(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    dc.to_uint8(np.full((2, 8, 8, 1), np.nan, np.float32))


def test_cache_round_trip(classifier, cache_dir, monkeypatch, test_split):
  def no_training(seed=0):
    raise AssertionError(f"Retrained (seed {seed}) instead of loading.")

  monkeypatch.setattr(dc, "train_digits_classifier", no_training)
  loaded, accuracy = dc.get_digits_classifier(cache_dir)
  assert accuracy == classifier[1]
  first = dc.digits_features(classifier[0], test_split[0])
  second = dc.digits_features(loaded, test_split[0])
  for key in ("features", "logits"):
    np.testing.assert_array_equal(first[key], second[key])


def test_cache_with_other_architecture_is_not_trusted(classifier):
  variables = classifier[0]
  assert dc._matches_architecture(variables)
  params = dict(variables["params"])
  params["head"] = {"kernel": np.zeros((128, 7)), "bias": np.zeros(7)}
  assert not dc._matches_architecture({"params": params})
  del params["head"]
  assert not dc._matches_architecture({"params": params})
