"""Tests for ddpm_jax.data.input_pipeline, and the data checks of config.validation, on tfds
mock data and the bundled digits (no network)."""

import collections
import hashlib
import itertools
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import base
from ddpm_jax.config import validation
from ddpm_jax.data import digits as digits_lib
from ddpm_jax.data import input_pipeline


def _config(dataset="cifar10", batch_size=8, **data):
  config = base.get_config()
  config.data.update(dataset=dataset, **data)
  spec = input_pipeline.DATASETS[dataset]
  config.data.update(image_size=spec.image_size, num_channels=spec.num_channels)
  config.training.batch_size = batch_size
  config.eval.batch_size = batch_size
  return config


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def _keys(images: np.ndarray) -> list[str]:
  """Identifies examples by content: mock images are random, so hashes are unique."""
  return [hashlib.md5(image.tobytes()).hexdigest() for image in _to_uint8(images)]


def _source_keys(split: str = "train") -> list[str]:
  source = tfds.data_source("cifar10", split=split)
  return [hashlib.md5(source[i]["image"].tobytes()).hexdigest() for i in range(len(source))]


def _shard(index: int, count: int, drop_remainder: bool = True) -> grain.sharding.ShardOptions:
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count,
                                     drop_remainder=drop_remainder)


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "celeb_a"])
def test_train_batch_shape_dtype_and_range(dataset):
  config = _config(dataset)
  spec = input_pipeline.DATASETS[dataset]
  with tfds.testing.mock_data(num_examples=16):
    batch = next(input_pipeline.create_train_iterator(config))
  size, channels = spec.image_size, spec.num_channels
  assert batch["image"].shape == (8, size, size, channels)
  assert batch["image"].dtype == np.float32
  if spec.label_key is None:
    assert "label" not in batch  # celeb_a: unlabelled
  else:
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  # x / 127.5 - 1 of uint8 x: every value sits on the 256-level grid.
  levels = (batch["image"] + 1.0) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_flips_are_decided_per_image():
  with tfds.testing.mock_data(num_examples=64):
    plain = next(input_pipeline.create_train_iterator(_config(batch_size=32, random_flip=False)))
    flipped = next(input_pipeline.create_train_iterator(_config(batch_size=32, random_flip=True)))
  # Same seed, so the same records in the same order; only flips differ.
  np.testing.assert_array_equal(plain["label"], flipped["label"])
  same = [np.array_equal(a, b) for a, b in zip(plain["image"], flipped["image"])]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain["image"], flipped["image"])]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 0 < sum(mirrored) < len(mirrored)  # a strict, non-empty subset of the batch


def test_train_shards_are_disjoint_and_cover_the_split():
  config = _config(batch_size=8, random_flip=False)
  with tfds.testing.mock_data(num_examples=40):
    seen = []
    for index in range(2):
      iterator = input_pipeline.create_train_iterator(config, shard_options=_shard(index, 2))
      # 20 examples per shard, local batch 4: five batches are exactly one epoch.
      batches = list(itertools.islice(iterator, 5))
      assert batches[0]["image"].shape[0] == 4
      seen.append(set(itertools.chain.from_iterable(_keys(b["image"]) for b in batches)))
    everything = set(_source_keys())
  assert len(everything) == 40
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == everything


def test_eval_covers_every_example_exactly_once_over_shards():
  config = _config(batch_size=6, random_flip=True)  # flips must not apply to eval
  counts = collections.Counter()
  with tfds.testing.mock_data(num_examples=37):
    lengths = []
    for index in range(3):
      batches = list(input_pipeline.create_eval_iterator(
          config, split="test", shard_options=_shard(index, 3, drop_remainder=False)))
      lengths.append(len(batches))
      for batch in batches:
        assert batch["image"].shape == (2, 32, 32, 3)
        assert batch["mask"].dtype == bool
        counts.update(k for k, m in zip(_keys(batch["image"]), batch["mask"]) if m)
    expected = collections.Counter(_source_keys("test"))
  assert counts == expected  # every example once: none dropped, none duplicated, none flipped
  assert len(set(lengths)) == 1  # same number of batches on every process


def test_eval_pads_last_batch_and_keeps_order():
  config = _config("digits", batch_size=128)
  evaluation = input_pipeline.create_eval_iterator(config)
  batches = list(evaluation)
  assert len(batches) == len(evaluation) == 3  # 360 = 128 + 128 + 104
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 360 and not masks[360:].any()
  images, labels = input_pipeline.load_digits_arrays("test")
  got = np.concatenate([b["image"] for b in batches])[:360]
  np.testing.assert_array_equal(_to_uint8(got), images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:360], labels)


def test_orbax_checkpoint_resumes_iterator_exactly(tmp_path):
  config = _config(batch_size=8, random_flip=True)
  with tfds.testing.mock_data(num_examples=24):
    iterator = input_pipeline.create_train_iterator(config)
    for _ in range(3):
      next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
      manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(iterator.get_state())))
      manager.wait_until_finished()
      # Four more batches cross the epoch boundary (3 batches per epoch), reshuffle included.
      expected = list(itertools.islice(iterator, 4))
      resumed = input_pipeline.create_train_iterator(config)
      restored = manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
      resumed.set_state(restored["data"])
    got = list(itertools.islice(resumed, 4))
  assert restored["data"]["position"] == 3
  for want, have in zip(expected, got, strict=True):
    np.testing.assert_array_equal(want["image"], have["image"])
    np.testing.assert_array_equal(want["label"], have["label"])


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_global_batches_do_not_depend_on_the_process_count(dataset):
  """Global batch k is the same for P = 1, 2, 4 simulated processes (and after a restore on
  another P): concatenating the processes' rows gives the one-process batch, flips included."""
  config = _config(dataset, batch_size=8, random_flip=True)
  with tfds.testing.mock_data(num_examples=20):  # 2.5 batches per epoch: batches straddle
    want = list(itertools.islice(input_pipeline.create_train_iterator(config), 6))
    for count in (2, 4):
      iterators = [input_pipeline.create_train_iterator(config, shard_options=_shard(i, count))
                   for i in range(count)]
      for k in range(6):
        rows = [next(it) for it in iterators]
        assert rows[0]["image"].shape[0] == 8 // count
        for key in ("image", "label"):
          np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), want[k][key])
      if count == 2:
        state = iterators[0].get_state()
        assert state == iterators[1].get_state() and state["position"] == 6
    # A position saved on 2 processes restores on 4 (here: back to batch 3).
    state = {**state, "position": 3}
    iterators = [input_pipeline.create_train_iterator(config, shard_options=_shard(i, 4))
                 for i in range(4)]
    for it in iterators:
      it.set_state(state)
    for k in range(3, 6):
      np.testing.assert_array_equal(
          np.concatenate([next(it)["image"] for it in iterators]), want[k]["image"])


def test_shuffle_changes_every_epoch_and_iterator_is_infinite():
  config = _config(batch_size=8, random_flip=False)
  with tfds.testing.mock_data(num_examples=16):
    batches = list(itertools.islice(input_pipeline.create_train_iterator(config), 8))
    again = next(input_pipeline.create_train_iterator(config))
    config.training.seed = 1
    other_seed = next(input_pipeline.create_train_iterator(config))
    everything = sorted(_source_keys())
  keys = [k for b in batches for k in _keys(b["image"])]
  epochs = [keys[i:i + 16] for i in range(0, len(keys), 16)]
  assert len(epochs) == 4  # four epochs of a 16-example split, and still going
  for epoch in epochs:
    assert sorted(epoch) == everything  # each epoch is a permutation of the split
  assert len({tuple(epoch) for epoch in epochs}) == 4  # a fresh order every epoch
  np.testing.assert_array_equal(again["image"], batches[0]["image"])  # seeded
  assert not np.array_equal(other_seed["image"], batches[0]["image"])


def test_digits_batches_carry_the_sklearn_targets_of_their_images():
  config = _config("digits", batch_size=64, random_flip=False)
  images, labels = input_pipeline.load_digits_arrays("train")
  by_image = collections.defaultdict(set)
  for image, label in zip(images, labels):
    by_image[image.tobytes()].add(int(label))
  for batch in itertools.islice(input_pipeline.create_train_iterator(config), 3):
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (64,)
    for image, label in zip(_to_uint8(batch["image"]), batch["label"]):
      assert int(label) in by_image[image.tobytes()]
  evaluation = list(input_pipeline.create_eval_iterator(config))
  test_images, test_labels = input_pipeline.load_digits_arrays("test")
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in evaluation])[:len(test_labels)], test_labels)
  config.data.label_key = ""
  assert "label" not in next(input_pipeline.create_train_iterator(config))
  assert "label" not in next(iter(input_pipeline.create_eval_iterator(config)))


def test_tfds_batches_carry_the_label_feature():
  config = _config(batch_size=8, random_flip=False)
  with tfds.testing.mock_data(num_examples=16):
    source = tfds.data_source("cifar10", split="train")
    want = {hashlib.md5(source[i]["image"].tobytes()).hexdigest(): int(source[i]["label"])
            for i in range(len(source))}
    batch = next(input_pipeline.create_train_iterator(config))
    eval_batch = next(iter(input_pipeline.create_eval_iterator(config, split="train")))
    assert [want[k] for k in _keys(batch["image"])] == batch["label"].tolist()
    assert [want[k] for k in _keys(eval_batch["image"])] == eval_batch["label"].tolist()
    config.data.label_key = "class"
    with pytest.raises(ValueError, match=r"label_key='class'.*valid choices.*'label'"):
      validation.check_data(config)


def test_digits_are_sklearns_load_digits_in_order_and_rescaled():
  """The loader reads scikit-learn's CSV itself; it must give load_digits' images and targets,
  in order, with counts 0..16 rescaled to round(c * 255 / 16)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  want = datasets.load_digits()
  assert digits_lib._digits_csv() is not None  # the fast path is the one tested here
  images, labels = (np.concatenate(parts) for parts in zip(
      input_pipeline.load_digits_arrays("train"), input_pipeline.load_digits_arrays("test")))
  np.testing.assert_array_equal(labels, want.target)
  np.testing.assert_array_equal(images[..., 0], np.round(want.images * 255 / 16).astype(np.uint8))


def test_digits_works_offline():
  train_images, train_labels = input_pipeline.load_digits_arrays("train")
  test_images, test_labels = input_pipeline.load_digits_arrays("test")
  assert train_images.shape == (1437, 8, 8, 1) and test_images.shape == (360, 8, 8, 1)
  assert train_images.dtype == np.uint8 and train_images.max() == 255
  assert train_labels.shape == (1437,) and test_labels.shape == (360,)
  assert set(np.unique(train_labels)) == set(range(10))
  config = _config("digits", batch_size=16)
  validation.check_batches(config)
  validation.check_data(config)
  assert input_pipeline.num_examples(config, "train") == 1437
  assert input_pipeline.num_examples(config, "test") == 360
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32


def test_centre_crop_then_resize():
  image = np.arange(218 * 178 * 3, dtype=np.int64).reshape(218, 178, 3).astype(np.uint8)
  np.testing.assert_array_equal(input_pipeline._crop_and_resize(image, 140, 140),
                                image[39:179, 19:159])
  assert input_pipeline._crop_and_resize(image, 140, 64).shape == (64, 64, 3)
  wide = np.zeros((20, 50, 1), np.uint8)
  wide[:, 15:35] = 255  # the largest centred square is exactly the white block
  np.testing.assert_array_equal(input_pipeline._crop_and_resize(wide, None, 10), 255)


def test_unknown_dataset_and_split_list_valid_choices():
  config = _config()
  config.data.dataset = "imagenet"
  # The dataset name is checked with the other names, before the data checks that read it.
  with pytest.raises(ValueError, match=r"data\.dataset 'imagenet'.*valid choices") as error:
    validation.check_choices(config)
  assert "'cifar10'" in str(error.value) and "'digits'" in str(error.value)
  config = _config("digits")
  config.data.eval_split = "validation"
  with pytest.raises(ValueError, match="valid splits"):
    validation.check_data(config)


def test_missing_dataset_fails_fast_with_build_hint(tmp_path):
  config = _config(data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(input_pipeline.DatasetNotFoundError, match="tfds build cifar10") as error:
    validation.check_data(config)
  assert time.monotonic() - start < 10.0  # no download attempt, no network timeout
  assert isinstance(error.value, ValueError)
  assert "not prepared" in str(error.value) and "data_dir" in str(error.value)


def test_batch_not_divisible_by_devices():
  # conftest simulates 4 CPU devices.
  with pytest.raises(ValueError, match=r"not divisible.*4 devices.*batch_size=8"):
    validation.check_batches(_config("digits", batch_size=6))
  config = _config("digits", batch_size=8)
  config.eval.batch_size = 10
  with pytest.raises(ValueError, match="eval.batch_size=10 is not divisible"):
    validation.check_batches(config)
