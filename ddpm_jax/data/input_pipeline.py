"""Image input pipeline: tfds ArrayRecord (or in-memory digits) -> grain -> NHWC float32 batches.

Reading uses `tfds.data_source` (random access over ArrayRecord files, no TensorFlow) and grain.
The training order is global: batch k of every run is a function of the config, the seed and k
(see `global_order.GlobalOrder`), each process reading its rows of it, so the iterator state is
one global batch count that restores on any number of processes ("elastic resume"), flips included.

Every element is a dict of NumPy arrays for THIS process only:
  'image': float32 [local_batch, H, W, C] in [-1, 1] (uint8 x -> x / 127.5 - 1),
  'label': int32 [local_batch], only for labelled data (see `label_key`),
  'mask':  bool [local_batch], eval batches only (False on padding).
with local_batch = global batch // jax.process_count() (rows p*local_batch.. of each global batch).
"""

import dataclasses
import math
from typing import Any
from typing import Iterator

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from ddpm_jax.data import folder_source
from ddpm_jax.data import global_order
from ddpm_jax.data.digits import load_digits_arrays  # noqa: F401  (also this module's API)

_PREPARE_HINT = (
    "On a machine with internet, run `pip install -e '.[prepare]'` and then "
    "`tfds build {name} --file_format=array_record --data_dir=DIR`; copy DIR here (or to a "
    "bucket) and pass --config.data.data_dir=DIR.")


class DatasetNotFoundError(ValueError):
  """The tfds dataset is not prepared (as ArrayRecord) in the configured data_dir."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a dataset lives and how its raw images become square model inputs.

  Attributes:
    tfds_name: tfds name (with config), or None for the in-memory sklearn digits.
    image_size: side of the images the shipped configs train on.
    num_channels: channels of the stored images (1 grey, 3 RGB).
    splits: valid split names (tfds slicing such as 'train[:90%]' is allowed on top).
    label_key: feature holding the class, or None for unlabelled data (no 'label').
    crop: side of the central square crop in source pixels, None for the largest centred
      square (a no-op on square images). The crop is then resized to config.data.image_size.
  """
  tfds_name: str | None
  image_size: int
  num_channels: int
  splits: tuple[str, ...]
  label_key: str | None = "label"
  crop: int | None = None


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(None, 8, 1, ("train", "test")),
    "mnist": DatasetSpec("mnist", 28, 1, ("train", "test")),
    "fashion_mnist": DatasetSpec("fashion_mnist", 28, 1, ("train", "test")),
    "cifar10": DatasetSpec("cifar10", 32, 3, ("train", "test")),
    # 178x218 faces: the crop of score_sde / DDIM, 140 px around the image centre.
    "celeb_a": DatasetSpec("celeb_a", 64, 3, ("train", "validation", "test"), None, crop=140),
    "celeb_a_hq": DatasetSpec("celeb_a_hq/256", 256, 3, ("train",), None),
    "lsun_bedroom": DatasetSpec("lsun/bedroom", 256, 3, ("train", "validation"), None),
    "lsun_church": DatasetSpec("lsun/church_outdoor", 256, 3, ("train", "validation"), None),
    "lsun_cat": DatasetSpec("lsun/cat", 256, 3, ("train",), None),  # an object category: train only
    # data.data_dir holds the images (or ddpm_jax.pack_folder's output); any size, 1 or 3 channels.
    "folder": DatasetSpec(None, 32, 3, ("train",)),
}

def _spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid choices: {sorted(DATASETS)}.")
  return DATASETS[name]


class _ArraySource:
  """A grain random-access source over in-memory arrays, with tfds' record layout."""

  def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray):
    self._name, self._split = name, split
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._images)

  def __repr__(self) -> str:
    # grain stores repr(source) in iterator checkpoints and refuses to restore into a source
    # whose repr differs, so it must name the data, not the object's address.
    return f"_ArraySource(name={self._name!r}, split={self._split!r}, len={len(self)})"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._images[index], "label": self._labels[index]}


def open_source(data: ml_collections.ConfigDict, split: str) -> Any:
  """Opens one split of data.dataset as a random-access sequence of raw records, never
  downloading: tfds ArrayRecord, the in-memory digits, or a folder of images."""
  name, data_dir = data.dataset, data.data_dir
  spec = _spec(name)
  base_split = split.split("[")[0]
  if base_split not in spec.splits:
    raise ValueError(f"Dataset {name!r} has no split {split!r}; valid splits: {spec.splits}.")
  if name == "folder":  # one split: every image in the folder
    return folder_source.open_folder(data_dir, data.image_size, data.num_channels,
                                     data.skip_corrupt)
  if spec.tfds_name is None:
    return _ArraySource(name, split, *load_digits_arrays(split))
  # Imported here so digits runs (and this module imports) without touching tfds.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # download=False: a missing dataset must fail now, not start a download (or hang on
    # a machine without network). Under tfds.testing.mock_data this returns mock records.
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir or None,
                            download=False)
  except Exception as e:  # tfds raises KeyError/NotImplementedError/... depending on state.
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir or None)
    if builder.is_prepared():
      problem = (f"is in {builder.data_dir} but not as ArrayRecord (random access needs "
                 "--file_format=array_record; rebuild it into a fresh data_dir)")
    else:
      problem = f"is not prepared in data_dir {builder.data_dir_root!s}"
    raise DatasetNotFoundError(
        f"Dataset {name!r} (tfds {spec.tfds_name!r}, split {split!r}) {problem}. "
        + _PREPARE_HINT.format(name=spec.tfds_name)) from e  # tfds' own error is the cause


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Returns the number of examples in `split` of config.data.dataset (all processes)."""
  return len(open_source(config.data, split))


def save_class_names(config: ml_collections.ConfigDict, workdir: str, source: Any = None) -> None:
  """Writes workdir/class_names.json (label -> class folder) when a folder source has classes.

  `source` is the opened train split, if the caller has it (else it is opened here)."""
  if config.data.dataset == "folder":
    source = source if source is not None else open_source(config.data, config.data.train_split)
    folder_source.write_class_names(source, workdir)


def _local_batch(global_batch: int, shard_count: int) -> int:
  if global_batch <= 0 or global_batch % shard_count:
    raise ValueError(f"Global batch size {global_batch} must be a positive multiple of the "
                     f"process count {shard_count}.")
  return global_batch // shard_count


def check_splits(config: ml_collections.ConfigDict, splits) -> dict[str, Any]:
  """Opens each of `splits` of config.data.dataset from data.data_dir (no network), and checks
  that the configured label feature exists in it (`config.validation` calls this once a run).

  Returns:
    {split: the opened source}, for the run to read from instead of opening them again.

  Raises:
    ValueError: an unknown split, or a label_key the records do not have.
    DatasetNotFoundError: the tfds dataset is not prepared in config.data.data_dir.
  """
  sources = {split: open_source(config.data, split) for split in dict.fromkeys(splits)}
  for source in sources.values():
    label_key(config, source)
  return sources


def _crop_and_resize(image: np.ndarray, crop: int | None, size: int) -> np.ndarray:
  """Central square crop of side `crop` (None: largest), then antialiased bicubic resize."""
  height, width = image.shape[:2]
  side = min(height, width) if crop is None else min(crop, height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image = image[top:top + side, left:left + side]
  if side != size:
    channels = image.shape[-1]
    # PIL wants 2-D arrays for grey images; its BICUBIC widens the kernel when shrinking.
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    image = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    image = image.reshape(size, size, channels)
  return image


def label_key(config: ml_collections.ConfigDict, source: Any = None) -> str | None:
  """The record feature that holds the class of config.data.dataset, or None if unlabelled.

  config.data.label_key names it ("" turns labels off). The default "label" on a dataset whose
  spec has no labels (celeb_a, lsun, ...) means unlabelled; any other key must exist.

  Args:
    config: experiment config (reads data.dataset and data.label_key).
    source: the opened split, to check that the feature exists; None skips the check.

  Raises:
    ValueError: config.data.label_key names a feature the records do not have.
  """
  key = config.data.label_key
  if not key:
    return None
  if config.data.dataset in DATASETS and _spec(config.data.dataset).label_key is None:
    if key == "label":
      return None
  if source is not None and len(source):
    features = sorted(source[0])
    if key == "label" and key not in features:
      return None  # the default on unlabelled records (a folder without class subfolders)
    if key not in features:
      raise ValueError(f"config.data.label_key={key!r} is not a feature of dataset "
                       f"{config.data.dataset!r}; valid choices: {features} or '' for no labels.")
  return key


class _Preprocess(grain.transforms.Map):
  """Raw record -> {'image': uint8 [S, S, C]} plus 'label': int32 when `label_key` is set."""

  def __init__(self, spec: DatasetSpec, image_size: int, label_key: str | None):
    self._crop, self._size, self._label_key = spec.crop, image_size, label_key

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(element["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    out = {"image": _crop_and_resize(image, self._crop, self._size)}
    if self._label_key:
      out["label"] = np.asarray(element[self._label_key], np.int32)
    return out


class _Augment(grain.transforms.Map):
  """_Preprocess, then the horizontal flip that `GlobalOrder` decided for the record."""

  def __init__(self, preprocess: _Preprocess):
    self._preprocess = preprocess

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    out = self._preprocess.map(element["record"])
    if element["flip"]:
      out["image"] = out["image"][:, ::-1]
    return out


class _ToFloat(grain.transforms.Map):
  """uint8 [0, 255] -> float32 [-1, 1], on whole batches so that NumPy vectorises it."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = batch["image"].astype(np.float32)
    image *= 1.0 / 127.5
    image -= 1.0
    return {**batch, "image": image}


def _shard_options(shard_options: grain.sharding.ShardOptions | None,
                   drop_remainder: bool) -> grain.sharding.ShardOptions:
  if shard_options is None:
    return grain.sharding.ShardOptions(shard_index=jax.process_index(),
                                       shard_count=jax.process_count(),
                                       drop_remainder=drop_remainder)
  return shard_options


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
    source: Any = None,
) -> global_order.TrainIterator:
  """Returns an endless, checkpointable iterator of this process's rows of the global batches.

  Global batch k (training.batch_size records) is a function of the data config,
  training.seed and k alone (see `global_order.GlobalOrder`); this process gets its contiguous
  share of the rows. Reading and decoding run in grain (threads, and data.num_workers processes
  that each build whole batches, so the batches do not depend on the worker count either).

  Args:
    config: experiment config (reads `data` and `training.batch_size`, `training.seed`).
    shard_options: which rows to read (shard_index of shard_count processes); defaults to this
      JAX process's. Tests pass one to stand in for several processes.
    source: the opened train split (`check_splits`), if the caller has it.

  Returns:
    A `global_order.TrainIterator` yielding {'image': float32 [B, H, W, C], 'label': int32 [B]}
    ('label' only for labelled data), B = training.batch_size // shard count.
  """
  data = config.data
  spec = _spec(data.dataset)
  shard_options = _shard_options(shard_options, drop_remainder=True)
  global_batch = config.training.batch_size
  local_batch = _local_batch(global_batch, shard_options.shard_count)
  source = source if source is not None else open_source(data, data.train_split)
  if len(source) < global_batch:
    logging.warning("The split has %d examples, fewer than one global batch of %d; batches "
                    "repeat examples across epochs.", len(source), global_batch)
  augment = _Augment(_Preprocess(spec, data.image_size, label_key(config, source)))
  threads = max(2, data.prefetch_batches)

  def make(start: int) -> grain.IterDataset:
    rows = global_order.GlobalOrder(
        source, seed=config.training.seed, global_batch=global_batch,
        shard_index=shard_options.shard_index, shard_count=shard_options.shard_count,
        start=start, flip=data.random_flip)
    # Batching before the worker split: each worker builds whole batches, in order.
    dataset = (grain.MapDataset.source(rows).map(augment)
               .batch(local_batch, drop_remainder=True).map(_ToFloat())
               .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                  prefetch_buffer_size=threads)))
    if data.num_workers > 0:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch_batches)))
    return dataset

  return global_order.TrainIterator(make, {
      "format": global_order.STATE_FORMAT, "position": 0, "batch_size": global_batch,
      "seed": config.training.seed, "num_records": len(source)})


class _PaddedShard:
  """Records [start, end) of a source, then copies of one record (masked) up to `length`."""

  def __init__(self, source: Any, start: int, end: int, length: int):
    self._source, self._start, self._end, self._length = source, start, end, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    real = index < self._end - self._start
    # Padding reuses a real record so that it has the dataset's shape; the mask hides it.
    source_index = self._start + index if real else min(self._start, len(self._source) - 1)
    return {**self._source[source_index], "mask": real}


class _MaskedPreprocess(_Preprocess):
  """_Preprocess that carries _PaddedShard's 'mask' through to the batch."""

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return {**super().map(element), "mask": np.asarray(element["mask"], bool)}


class EvalIterable:
  """One ordered pass over a split; iterate it as often as needed. len() = batches."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int, num_examples: int):
    self._dataset = dataset
    self.num_batches = num_batches
    self.num_examples = num_examples  # real examples in this shard

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._dataset)


def create_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    batch_size: int | None = None,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> EvalIterable:
  """Returns one pass, in order and unaugmented, over this process's shard of a split.

  No example is dropped: the shards are contiguous and cover the split, and the last batch is
  padded to full size with 'mask' False. Every process gets the same number of batches (as
  many as the largest shard needs), so collective ops in the evaluator line up.

  Args:
    config: experiment config (reads `data` and `eval.batch_size`).
    split: tfds split; defaults to config.data.eval_split.
    batch_size: GLOBAL batch size; defaults to config.eval.batch_size.
    shard_options: which shard to read; defaults to this JAX process's.

  Returns:
    A re-iterable of {'image': float32 [B, H, W, C], 'label': int32 [B], 'mask': bool [B]}
    ('label' only for labelled data), B = batch_size // shard count, len() = batches.
  """
  data = config.data
  split = split or data.eval_split
  shard_options = _shard_options(shard_options, drop_remainder=False)
  count, index = shard_options.shard_count, shard_options.shard_index
  local_batch = _local_batch(batch_size or config.eval.batch_size, count)
  source = open_source(data, split)
  total = len(source)
  # grain's DataLoader would silently drop an uneven shard's last example, so split here.
  start, end = index * total // count, (index + 1) * total // count
  num_batches = math.ceil(math.ceil(total / count) / local_batch)
  padded = _PaddedShard(source, start, end, num_batches * local_batch)
  dataset = (grain.MapDataset.source(padded)
             .map(_MaskedPreprocess(_spec(data.dataset), data.image_size,
                                    label_key(config, source)))
             .batch(local_batch, drop_remainder=True)
             .map(_ToFloat()))
  prefetch = max(1, data.prefetch_batches)
  # Elements are whole batches here, so the prefetch buffer is counted in batches.
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  if data.num_workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data.num_workers))
  return EvalIterable(iter_dataset, num_batches, end - start)
