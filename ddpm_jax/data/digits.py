"""scikit-learn's 1,797 handwritten 8x8 digits: the offline default dataset (no download).

It ships inside scikit-learn, so runs, tests and the digits metric work without a network.
"""

import functools
import gzip
import importlib.util
import pathlib

import numpy as np

# sklearn's digits are 1,797 examples in a fixed order; the last 360 are the held-out split.
_DIGITS_NUM_TRAIN = 1437


def _digits_csv() -> pathlib.Path | None:
  """scikit-learn's own copy of the digits (`sklearn/datasets/data/digits.csv.gz`), found without
  importing scikit-learn (0.6 s of imports on a 2-core Xeon, paid by every run on digits)."""
  spec = importlib.util.find_spec("sklearn")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = pathlib.Path(folder, "datasets", "data", "digits.csv.gz")
    if path.is_file():
      return path
  return None


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  path = _digits_csv()
  if path is not None:  # 64 pixel columns, then the label: what sklearn's load_digits parses
    with gzip.open(path, "rt") as f:
      data = np.loadtxt(f, delimiter=",")
    counts, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
  else:  # a scikit-learn that keeps the file elsewhere
    from sklearn import datasets  # pylint: disable=g-import-not-at-top  # slow import, only here
    digits = datasets.load_digits()
    counts, target = digits.images, digits.target
  # Pixel values are counts (0..16) of set pixels in a 4x4 block; rescale to the usual uint8 range.
  images = np.round(counts * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, target.astype(np.int32)


def load_digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns sklearn's digits as (uint8 images [N, 8, 8, 1], int32 labels [N]).

  Args:
    split: 'train' (the first 1,437 examples in sklearn order) or 'test' (the last 360).
  """
  images, labels = _all_digits()
  match split:
    case "train":
      part = slice(None, _DIGITS_NUM_TRAIN)
    case "test":
      part = slice(_DIGITS_NUM_TRAIN, None)
    case _:
      raise ValueError(f"Unknown digits split {split!r}; valid choices: ['test', 'train'].")
  return images[part].copy(), labels[part].copy()
