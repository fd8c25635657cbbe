"""Images per second of the training input pipeline (read, flip, batch, uint8 -> float32).

CIFAR-10 runs on `tfds.testing.mock_data` (random 32x32 images through the real ArrayRecord-style
data source API), so no download is needed; digits reads the bundled scikit-learn arrays.
`folder` writes --num_examples random 32x32 PNGs in 10 class folders to a temporary directory and
reads them raw (Pillow decode per image); `folder_packed` reads the same folder after
`ddpm_jax.pack_folder` (ArrayRecord, no decoding).

  python benchmarks/input_throughput.py
  python benchmarks/input_throughput.py --datasets=cifar10 --num_workers=2 --num_batches=500
  python benchmarks/input_throughput.py --datasets=folder,folder_packed --num_workers=0,2
"""

import functools
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from configs import base
from ddpm_jax.data import input_pipeline
from ddpm_jax.data import pack_folder
from ddpm_jax.runtime import process_env

_DATASETS = flags.DEFINE_list("datasets", ["cifar10", "digits"], "Datasets to measure.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 5000, "Mock CIFAR-10 split size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 300, "Timed batches, after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed batches (fills prefetch buffers).")
_NUM_WORKERS = flags.DEFINE_list("num_workers", ["0"], "grain worker processes (one run each).")


@functools.cache
def _folders() -> tuple[str, str]:
  """(raw folder, packed folder) of --num_examples random 32x32 RGB PNGs in 10 classes."""
  root = tempfile.mkdtemp(prefix="input_throughput_")
  rng = np.random.default_rng(0)
  for index in range(_NUM_EXAMPLES.value):
    directory = os.path.join(root, "raw", f"class{index % 10}")
    os.makedirs(directory, exist_ok=True)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(os.path.join(directory, f"{index:06d}.png"))
  raw, packed = os.path.join(root, "raw"), os.path.join(root, "packed")
  pack_folder.pack(raw, packed, 32, 3)
  return raw, packed


def _measure(dataset: str, num_workers: int) -> float:
  """Returns training images/s for `dataset` at the flags' settings."""
  config = base.get_config()
  if dataset.startswith("folder"):
    raw, packed = _folders()
    config.data.update(dataset="folder", data_dir=packed if dataset == "folder_packed" else raw,
                       image_size=32, num_channels=3)
  else:
    spec = input_pipeline.DATASETS[dataset]
    config.data.update(dataset=dataset, image_size=spec.image_size,
                       num_channels=spec.num_channels)
  config.data.update(random_flip=True, num_workers=num_workers)
  config.training.batch_size = _BATCH_SIZE.value
  iterator = input_pipeline.create_train_iterator(config)
  for _ in range(_WARMUP.value):
    next(iterator)
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  images = _NUM_BATCHES.value * batch["image"].shape[0]
  print(f"{dataset}: {images / seconds:,.0f} images/s ({_NUM_BATCHES.value} batches of "
        f"{tuple(batch['image'].shape)}, {seconds:.2f} s, num_workers={num_workers})")
  # The raw read rate bounds the pipeline; under the mock it is tfds generating random records.
  source = input_pipeline.open_source(config.data, "train")
  count = min(len(source), _NUM_BATCHES.value * batch["image"].shape[0])
  start = time.perf_counter()
  for index in range(count):
    source[index]  # pylint: disable=pointless-statement
  print(f"{dataset}: raw source reads alone: {count / (time.perf_counter() - start):,.0f} "
        "records/s")
  return images / seconds


def main(argv):
  del argv
  for dataset in _DATASETS.value:
    for num_workers in map(int, _NUM_WORKERS.value):
      if dataset in ("digits", "folder", "folder_packed"):
        _measure(dataset, num_workers)
      else:
        # The mock stands in for a prepared dataset; real runs read ArrayRecord from data_dir.
        with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES.value):
          _measure(dataset, num_workers)


if __name__ == "__main__":
  process_env.set_defaults()  # an entry point: before jax starts a backend
  app.run(main)
