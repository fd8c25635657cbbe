"""Images per second of the training input pipeline (read, flip, batch, uint8 -> float32).

CIFAR-10 runs on `tfds.testing.mock_data` (random 32x32 images through the real ArrayRecord-style
data source API), so no download is needed; digits reads the bundled scikit-learn arrays.

  python benchmarks/input_throughput.py
  python benchmarks/input_throughput.py --datasets=cifar10 --num_workers=2 --num_batches=500
"""

import time

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from configs import base
from ddpm_jax import input_pipeline

_DATASETS = flags.DEFINE_list("datasets", ["cifar10", "digits"], "Datasets to measure.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 5000, "Mock CIFAR-10 split size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 300, "Timed batches, after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed batches (fills prefetch buffers).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes.")


def _measure(dataset: str) -> float:
  """Returns training images/s for `dataset` at the flags' settings."""
  spec = input_pipeline.DATASETS[dataset]
  config = base.get_config()
  config.data.update(dataset=dataset, image_size=spec.image_size,
                     num_channels=spec.num_channels, random_flip=True,
                     num_workers=_NUM_WORKERS.value)
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
        f"{tuple(batch['image'].shape)}, {seconds:.2f} s, num_workers={_NUM_WORKERS.value})")
  # The raw read rate bounds the pipeline; under the mock it is tfds generating random records.
  source = input_pipeline._open_source(dataset, "train", "")  # pylint: disable=protected-access
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
    if dataset == "digits":
      _measure(dataset)
    else:
      # The mock stands in for a prepared dataset; real runs read ArrayRecord from data_dir.
      with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES.value):
        _measure(dataset)


if __name__ == "__main__":
  app.run(main)
