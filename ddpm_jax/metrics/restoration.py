"""Restoration metrics on host arrays: PSNR, SSIM and measurement consistency.

Pure NumPy in float64. Images are float arrays ``[B, H, W, C]`` in ``[-1, 1]``, so the default
data range is 2. Every metric is returned per image (shape ``[B]``); ``per_image`` gathers those
the inputs allow, ``mean`` averages them (PSNR over its finite values), ``summary`` does both.

* ``psnr``: ``10 log10(data_range^2 / MSE)``, ``inf`` where the images are equal.
* ``ssim``: the structural similarity of Wang, Bovik, Sheikh and Simoncelli, "Image quality
  assessment: from error visibility to structural similarity", IEEE Transactions on Image
  Processing 13(4), 2004, exactly as scikit-image's ``structural_similarity`` computes it by
  default (``channel_axis=-1``): a uniform ``win x win`` window (``win = 7``), ``K1 = 0.01``,
  ``K2 = 0.03``, sample (co)variances (the ``N / (N - 1)`` correction of the window's
  ``N = win^2`` pixels, ``use_sample_covariance=True``), and the SSIM map averaged over the
  valid area (a border of ``(win - 1) // 2`` pixels cropped from each side) and over the
  channels. Unlike scikit-image, which refuses images smaller than the window, an image with
  ``H`` or ``W`` below ``win_size`` takes the largest odd window that fits,
  ``min(H, W)`` rounded down to odd (5 for 5x5 or 6x6, 3 for 3x3 or 4x4); 8x8 digits keep 7.
* ``consistency``: ``||A x^ - y|| / ||y||``, how well a restoration explains its measurement.
"""

import numpy as np

DATA_RANGE = 2.0  # images in [-1, 1]
WIN_SIZE = 7
K1 = 0.01
K2 = 0.03


def _check_pair(x, ref) -> tuple[np.ndarray, np.ndarray]:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if x.shape != ref.shape or x.ndim != 4:
    raise ValueError(f"Expected two [B, H, W, C] arrays of one shape, got {x.shape} and "
                     f"{ref.shape}.")
  return x, ref


def psnr(x, ref, data_range: float = DATA_RANGE) -> np.ndarray:
  """Peak signal-to-noise ratio per image.

  Args:
    x: images [B, H, W, C].
    ref: reference images, same shape.
    data_range: max - min of the pixel scale (2 for [-1, 1]).

  Returns:
    ``10 log10(data_range^2 / mse)`` [B] in dB (mse over H, W, C), ``inf`` where mse == 0.
  """
  x, ref = _check_pair(x, ref)
  mse = np.mean((x - ref) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range**2 / mse)


def ssim_window(height: int, width: int, win_size: int = WIN_SIZE) -> int:
  """The window ``ssim`` uses: ``win_size``, or the largest odd size <= min(height, width)."""
  if win_size < 3 or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and >= 3, got {win_size}.")
  win = min(win_size, height, width)
  win = win if win % 2 else win - 1
  if win < 3:
    raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}.")
  return win


def _box_mean(a: np.ndarray, win: int) -> np.ndarray:
  """Mean over every whole win x win window of [B, H, W, C]: [B, H - win + 1, W - win + 1, C].

  Separable running sums: a cumulative sum along H, differenced ``win`` rows apart, then the
  same along W (each sum grows only along its own axis, which keeps the round-off small).
  """
  s = np.cumsum(a, axis=1)
  s = np.concatenate([s[:, win - 1:win], s[:, win:] - s[:, :-win]], axis=1)
  s = np.cumsum(s, axis=2)
  s = np.concatenate([s[:, :, win - 1:win], s[:, :, win:] - s[:, :, :-win]], axis=2)
  return s / (win * win)


def ssim(x, ref, data_range: float = DATA_RANGE, win_size: int = WIN_SIZE) -> np.ndarray:
  """Mean structural similarity per image (Wang et al., 2004), as scikit-image computes it.

  Equals ``skimage.metrics.structural_similarity(x[i], ref[i], channel_axis=-1,
  data_range=data_range, win_size=win)`` for every ``i``, with ``win = ssim_window(H, W,
  win_size)`` (``win_size`` unless the image is smaller than that).

  Args:
    x: images [B, H, W, C].
    ref: reference images, same shape (SSIM is symmetric in the two).
    data_range: max - min of the pixel scale (2 for [-1, 1]); sets C1 = (K1 L)^2, C2 = (K2 L)^2.
    win_size: odd side of the uniform window.

  Returns:
    SSIM [B], the map's mean over the valid area and the channels; 1 for identical images.
  """
  x, ref = _check_pair(x, ref)
  win = ssim_window(x.shape[1], x.shape[2], win_size)
  n = win * win
  cov_norm = n / (n - 1.0)  # sample (co)variances over the window
  ux, uy = _box_mean(x, win), _box_mean(ref, win)
  vx = cov_norm * (_box_mean(x * x, win) - ux * ux)
  vy = cov_norm * (_box_mean(ref * ref, win) - uy * uy)
  vxy = cov_norm * (_box_mean(x * ref, win) - ux * uy)
  c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return s.mean(axis=(1, 2, 3))


def consistency(ax_hat, y) -> np.ndarray:
  """Relative measurement residual per image.

  Args:
    ax_hat: the restorations with the degradation already applied, ``A x^`` [B, ...].
    y: the measurements, same shape.

  Returns:
    ``||A x^ - y|| / ||y||`` [B] (Frobenius norms per image); where ``||y|| == 0``, the plain
    ``||A x^ - y||``.
  """
  ax_hat, y = np.asarray(ax_hat, np.float64), np.asarray(y, np.float64)
  if ax_hat.shape != y.shape or y.ndim < 1:
    raise ValueError(f"Expected A x^ and y of one shape [B, ...], got {ax_hat.shape} and "
                     f"{y.shape}.")
  b = y.shape[0]
  err = np.linalg.norm((ax_hat - y).reshape(b, -1), axis=1)
  norm = np.linalg.norm(y.reshape(b, -1), axis=1)
  return err / np.where(norm > 0, norm, 1.0)


def per_image(x, ref=None, ax_hat=None, y=None, data_range: float = DATA_RANGE) -> dict:
  """Every metric the inputs allow, per image.

  Args:
    x: restored images [B, H, W, C].
    ref: ground-truth images, same shape, or None (no PSNR, SSIM).
    ax_hat: ``A x^`` for ``consistency`` (with ``y``), or None.
    y: the measurements that go with ``ax_hat``.
    data_range: max - min of the pixel scale (2 for [-1, 1]).

  Returns:
    ``{"psnr": [B], "ssim": [B]}`` when ``ref`` is given, and ``"consistency": [B]`` when
    ``ax_hat`` and ``y`` are.
  """
  if (ax_hat is None) != (y is None):
    raise ValueError("consistency needs both ax_hat and y.")
  out = {}
  if ref is not None:
    out.update(psnr=psnr(x, ref, data_range), ssim=ssim(x, ref, data_range))
  if ax_hat is not None:
    out["consistency"] = consistency(ax_hat, y)
  return out


def mean(metrics: dict) -> dict:
  """Batch means of `per_image`'s metrics, as Python numbers: PSNR over its finite values (inf
  if none is), with "psnr_inf" counting the exact images (infinite PSNR)."""
  out = {k: float(np.mean(v)) for k, v in metrics.items() if k != "psnr"}
  if "psnr" in metrics:
    p = np.asarray(metrics["psnr"])
    finite = np.isfinite(p)
    out["psnr"] = float(p[finite].mean()) if finite.any() else float("inf")
    out["psnr_inf"] = int((~finite).sum())
  return out


def summary(x, ref=None, ax_hat=None, y=None, data_range: float = DATA_RANGE) -> dict:
  """``mean(per_image(...))``: the batch means of every metric the inputs allow."""
  return mean(per_image(x, ref, ax_hat, y, data_range))
