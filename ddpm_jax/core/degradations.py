"""Linear degradation operators y = A x (+ sigma_y n) of image restoration, as pure functions.

Every operator acts on a batch [B, H, W, C] and gives, besides A itself, its adjoint A^T and
`pinv_reg(v, eps) = A^T (A A^T + eps I)^+ v`: eps = 0 is the Moore-Penrose pseudo-inverse A^+
(on the range of A), eps > 0 the regularised solve of the zero-shot solvers (DDNM's noisy
variant, PiGDM; `sampling.restoration`). Each A is chosen so that A A^T is diagonal in a basis
the operator knows, which makes these exact in a few array operations:

| task           | A (y shape)                                         | A A^T                   |
|----------------|-----------------------------------------------------|-------------------------|
| sr2, sr4       | average pooling by f ([B, H/f, W/f, C])             | I / f^2                 |
| blur_gauss     | circular Gaussian blur, std 1 px, 5x5 taps          | |k^(omega)|^2 (Fourier) |
| blur_uniform   | circular 3x3 box blur                               | |k^(omega)|^2 (Fourier) |
| colourise      | mean over the channels ([B, H, W, 1])               | I / C                   |
| inpaint        | keep mask M (y = M x, same shape, 0 where unknown)  | M                       |
| denoise        | identity                                            | I                       |

Super-resolution by average pooling: its A^+ is nearest-neighbour upsampling (Wang et al. 2023,
DDNM, sec. 3.3). The blurs are circular convolutions, diagonal in the 2-D DFT with the kernel's
spectrum k^; frequencies with |k^| < `BLUR_CUTOFF` max|k^| are taken as outside the range (the
spectrum of A is k^ there set to 0, the truncated SVD of DDRM, Kawar et al. 2022, sec. 4.3), so
that A A^+ A = A holds exactly rather than through divisions by 1e-4.

The identities A A^+ A = A, <A x, y> = <x, A^T y> and pinv_reg's closed form are checked in
`tests/degradations_test.py` on random inputs for every task.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("sr2", "sr4", "blur_gauss", "blur_uniform", "colourise", "inpaint", "denoise")
BLUR_CUTOFF = 0.03  # relative to the largest |k^|: weaker frequencies are outside the range
GAUSS_STD, GAUSS_TAPS = 1.0, 5
BOX_TAPS = 3


class Operator(NamedTuple):
  """A linear measurement operator on [B, H, W, C] images.

  A, At: x -> y and y -> x. pinv_reg(v, eps): A^T (A A^T + eps I)^+ v for y-shaped v, eps >= 0
  (a scalar or [B]). y_shape(x_shape): the measurement's shape. task: its name in `TASKS`.
  """

  task: str
  A: Callable
  At: Callable
  pinv_reg: Callable
  y_shape: Callable

  def pinv(self, y):
    """A^+ y."""
    return self.pinv_reg(y, 0.0)


def _eps(eps, ndim):
  eps = jnp.asarray(eps, jnp.float32)
  return eps.reshape(eps.shape + (1,) * (ndim - eps.ndim)) if eps.ndim else eps


def _safe_inv(d, eps):
  """1 / (d + eps) where d + eps > 0, else 0 (the pseudo-inverse of a diagonal)."""
  den = d + eps
  return jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)


def super_resolution(factor: int) -> Operator:
  """Average pooling by `factor`; A^T spreads y / f^2 over each block, A^+ repeats y."""
  f = int(factor)

  def A(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

  def At(y):
    return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2) / (f * f)

  def pinv_reg(v, eps):
    # A A^T = I / f^2: A^T (I / f^2 + eps)^-1 v.
    return At(v) * _safe_inv(1.0 / (f * f), _eps(eps, v.ndim))

  return Operator(f"sr{f}", A, At, pinv_reg, lambda s: (s[0], s[1] // f, s[2] // f, s[3]))


def upsample_bilinear(y, factor: int):
  """[B, h, w, C] -> [B, f h, f w, C] by bilinear interpolation (half-pixel centres, edges
  clamped): the plain super-resolution baseline, and what a super-resolution stage sees of its
  low-resolution input (SR3, Saharia et al. 2021)."""
  b, h, w, c = y.shape
  return jax.image.resize(y, (b, h * factor, w * factor, c), "bilinear")


def colourise(channels: int) -> Operator:
  """RGB -> grey as the mean over the channels; A^+ repeats the grey value in every channel."""
  c = int(channels)
  A = lambda x: x.mean(axis=-1, keepdims=True)
  At = lambda y: jnp.repeat(y, c, axis=-1) / c
  pinv_reg = lambda v, eps: At(v) * _safe_inv(1.0 / c, _eps(eps, v.ndim))
  return Operator("colourise", A, At, pinv_reg, lambda s: (*s[:3], 1))


def inpainting(mask) -> Operator:
  """y = M x with a keep mask M ([H, W, 1] or [H, W, C], 1 = known); A = A^T = A^+ = M."""
  m = jnp.asarray(mask, jnp.float32)
  A = lambda x: m * x
  pinv_reg = lambda v, eps: m * v * _safe_inv(m, _eps(eps, v.ndim))
  return Operator("inpaint", A, A, pinv_reg, lambda s: tuple(s))


def identity() -> Operator:
  """Denoising: y = x + sigma_y n."""
  ident = lambda x: x
  pinv_reg = lambda v, eps: v * _safe_inv(1.0, _eps(eps, v.ndim))
  return Operator("denoise", ident, ident, pinv_reg, lambda s: tuple(s))


def blur_kernel(kind: str) -> np.ndarray:
  """The 2-D blur kernel (odd side, sums to 1): 'gauss' (std 1 px, 5 taps) or 'uniform' (3x3)."""
  if kind == "gauss":
    r = np.arange(GAUSS_TAPS) - GAUSS_TAPS // 2
    k1 = np.exp(-0.5 * (r / GAUSS_STD) ** 2)
  elif kind == "uniform":
    k1 = np.ones(BOX_TAPS)
  else:
    raise ValueError(f"Unknown blur {kind!r}; valid choices: ['gauss', 'uniform'].")
  k = np.outer(k1, k1)
  return k / k.sum()


def blur_spectrum(kernel: np.ndarray, height: int, width: int) -> np.ndarray:
  """The truncated DFT of the centred, circularly wrapped kernel on an H x W grid (real, even)."""
  kh, kw = kernel.shape
  if kh > height or kw > width:
    raise ValueError(f"A {kh}x{kw} blur kernel does not fit {height}x{width} images.")
  padded = np.zeros((height, width))
  padded[:kh, :kw] = kernel
  padded = np.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1))  # centre on pixel (0, 0)
  spec = np.fft.fft2(padded).real  # a symmetric kernel has a real spectrum
  return np.where(np.abs(spec) >= BLUR_CUTOFF * np.abs(spec).max(), spec, 0.0)


def blur(kind: str, height: int, width: int) -> Operator:
  """Circular convolution with `blur_kernel(kind)`, diagonal in the 2-D DFT over (H, W)."""
  spec = blur_spectrum(blur_kernel(kind), height, width)
  k = jnp.asarray(spec, jnp.float32)[None, :, :, None]

  def apply(x, gain):
    xf = jnp.fft.fft2(x, axes=(1, 2))
    return jnp.fft.ifft2(xf * gain, axes=(1, 2)).real.astype(x.dtype)

  A = lambda x: apply(x, k)  # the spectrum is real, so A^T = A
  pinv_reg = lambda v, eps: apply(v, k * _safe_inv(k * k, _eps(eps, v.ndim)))
  return Operator(f"blur_{kind}", A, A, pinv_reg, lambda s: tuple(s))


def check(task: str, image_size: int, num_channels: int) -> None:
  """Raises ValueError, naming the fix, if `task` cannot take [image_size, image_size, C]."""
  if task not in TASKS:
    raise ValueError(f"Unknown restoration task {task!r}; valid choices: {list(TASKS)}.")
  if task in ("sr2", "sr4"):
    f = int(task[2:])
    if image_size % f:
      raise ValueError(f"Super-resolution x{f} needs an image size divisible by {f}; "
                       f"the model's is {image_size}.")
  if task == "colourise" and num_channels == 1:
    raise ValueError("Colourisation needs a colour model (data.num_channels = 3); this one has "
                     "one channel.")
  if task.startswith("blur"):
    taps = GAUSS_TAPS if task == "blur_gauss" else BOX_TAPS
    if image_size < taps:
      raise ValueError(f"{task} has a {taps}x{taps} kernel, larger than {image_size}x"
                       f"{image_size} images.")


def make(task: str, image_size: int, num_channels: int, mask=None) -> Operator:
  """The operator of `task` for square images (`check` first); inpaint needs a keep `mask`."""
  check(task, image_size, num_channels)
  if task in ("sr2", "sr4"):
    return super_resolution(int(task[2:]))
  if task.startswith("blur_"):
    return blur(task[len("blur_"):], image_size, image_size)
  if task == "colourise":
    return colourise(num_channels)
  if task == "inpaint":
    if mask is None:
      raise ValueError("The inpaint operator needs a keep mask.")
    return inpainting(mask)
  return identity()
