"""PSNR, SSIM and consistency (ddpm_jax.metrics.restoration) against closed forms and
scikit-image's structural_similarity, the reference implementation of Wang et al. 2004."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ddpm_jax.metrics import restoration


def _pair(shape, seed, noise=0.3):
  rng = np.random.default_rng(seed)
  ref = rng.uniform(-1, 1, shape)
  return np.clip(ref + noise * rng.standard_normal(shape), -1, 1), ref


def _skimage_ssim(x, ref, **kwargs):
  return [structural_similarity(a, b, channel_axis=-1, data_range=2.0, **kwargs)
          for a, b in zip(x, ref)]


def test_psnr_closed_form_and_identical_images():
  ref = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1))
  for d in (0.01, 0.1, 0.5):  # a constant offset: mse = d^2, psnr = 10 log10(2^2 / d^2)
    np.testing.assert_allclose(restoration.psnr(ref + d, ref), 10 * np.log10(4 / d**2),
                               rtol=1e-12)
  assert np.all(np.isposinf(restoration.psnr(ref, ref)))


def test_summary_means_and_counts_exact_images():
  ref = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1))
  x = np.concatenate([ref[:1], ref[1:] + 0.1])  # one exact image, two at psnr 10 log10(400)
  y = np.ones((3, 2)) * [[3.0], [4.0], [5.0]]
  s = restoration.summary(x, ref, ax_hat=y * 1.5, y=y)  # consistency 0.5 for each
  assert s["psnr_inf"] == 1 and s["psnr"] == pytest.approx(10 * np.log10(400), rel=1e-12)
  assert s["ssim"] == pytest.approx(np.mean(restoration.ssim(x, ref)), rel=1e-12)
  assert s["consistency"] == pytest.approx(0.5, rel=1e-12)
  assert "consistency" not in restoration.summary(x, ref)


@pytest.mark.parametrize("shape", [(8, 8, 1), (16, 16, 3), (32, 32, 3), (9, 13, 2)])
def test_ssim_matches_scikit_image(shape):
  x, ref = _pair((4, *shape), seed=1)
  ours = restoration.ssim(x, ref)
  np.testing.assert_allclose(ours, _skimage_ssim(x, ref), rtol=0, atol=1e-6)
  assert np.all(ours < 0.99)  # the noise is visible, so the comparison means something
  np.testing.assert_allclose(restoration.ssim(ref, x), ours, rtol=0, atol=1e-12)  # symmetric
  np.testing.assert_allclose(restoration.ssim(ref, ref), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, win", [(3, 3), (4, 3), (5, 5), (6, 5), (7, 7), (8, 7)])
def test_small_images_take_the_largest_odd_window(size, win):
  assert restoration.ssim_window(size, size) == win
  x, ref = _pair((3, size, size, 1), seed=2, noise=0.2)
  np.testing.assert_allclose(restoration.ssim(x, ref), _skimage_ssim(x, ref, win_size=win),
                             rtol=0, atol=1e-6)


def test_ssim_rejects_unusable_windows():
  with pytest.raises(ValueError, match="3x3"):
    restoration.ssim(np.zeros((1, 2, 8, 1)), np.zeros((1, 2, 8, 1)))
  with pytest.raises(ValueError, match="odd"):
    restoration.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)), win_size=4)


def test_consistency_closed_form():
  y = np.zeros((2, 2, 2, 1))
  y[0, 0, 0, 0] = 3.0  # ||y|| = 3
  ax = y.copy()
  ax[0, 1, 1, 0] = 4.0  # ||A x - y|| = 4
  ax[1, 0, 0, 0] = 2.0  # y = 0: the plain norm ||A x - y|| = 2
  np.testing.assert_allclose(restoration.consistency(ax, y), [4 / 3, 2.0], rtol=1e-12)
  np.testing.assert_allclose(restoration.consistency(y, y), [0.0, 0.0], atol=0)
