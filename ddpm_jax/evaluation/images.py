"""Turning model outputs in [-1, 1] into uint8 images, grids, PNGs and trajectory figures."""

import math

from etils import epath
import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats to uint8 [0, 255], rounding to the nearest level (the FID convention)."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] uint8 images into one [rows*(H+pad)+pad, ..., C] uint8 grid."""
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = img
  return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  """Saves an HWC uint8 image, upscaled by `scale` with nearest neighbours (for 8x8 digits)."""
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    img.save(f, format="PNG")


def save_trajectory_figure(path: str, trajectory: dict, num_examples: int = 8) -> None:
  """Progressive generation (DDPM fig. 6 style): x_t and the predicted x0 at recorded steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ts = np.asarray(trajectory["t"])
  rows = []
  for key in ("x_t", "pred_x0"):
    frames = to_uint8(np.asarray(trajectory[key])[:, :num_examples])  # [K, n, H, W, C]
    k, n = frames.shape[:2]
    by_example = frames.transpose(1, 0, 2, 3, 4).reshape(n * k, *frames.shape[2:])
    rows.append(make_grid(by_example, ncol=k))
  fig, axes = plt.subplots(2, 1, figsize=(max(4, len(ts) * 0.6), 2 * max(2, num_examples * 0.5)))
  for ax, grid, title in zip(axes, rows, ("x_t", "predicted x_0")):
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray")
    ax.set_title(f"{title}; columns: t = {', '.join(str(int(t) + 1) for t in ts)}", fontsize=8)
    ax.axis("off")
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
