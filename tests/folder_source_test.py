"""Tests for the image-folder source (ddpm_jax.data.folder_source) and its packer, on generated
PNGs."""

import collections
import hashlib
import itertools
import json
import logging

from absl import flags
import grain
import numpy as np
from PIL import Image
import pytest

from configs import folder as folder_config
from ddpm_jax.config import validation
from ddpm_jax.data import folder_source
from ddpm_jax.data import input_pipeline
from ddpm_jax.data import pack_folder
from tests.helpers import tiny_config

_CLASSES = ("cat", "ant", "bee")  # written unsorted: labels follow the sorted names


def _write_png(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path)


def _make_folder(root, per_class=8, classes=_CLASSES, size=(12, 10)):
  """Random RGB PNGs (wider than tall, larger than 8 px) in class subfolders."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(classes):
    for i in range(per_class):
      _write_png(root / name / f"{i:03d}.png",
                 rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  return root


def _config(data_dir, batch_size=8, **data):
  config = folder_config.get_config()
  config.data.update(data_dir=str(data_dir), image_size=8, num_channels=3, random_flip=False)
  config.data.update(**data)
  config.training.batch_size = batch_size
  config.eval.batch_size = batch_size
  return config


def _keys(images):
  levels = np.round((images + 1.0) * 127.5).astype(np.uint8)
  return [hashlib.md5(image.tobytes()).hexdigest() for image in levels]


def _shard(index, count, drop_remainder=True):
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count,
                                     drop_remainder=drop_remainder)


def test_order_labels_and_class_names(tmp_path):
  root = _make_folder(tmp_path / "images", per_class=2)
  paths, labels, classes, sides = folder_source.scan(str(root), False)
  assert classes == ("ant", "bee", "cat")
  assert [p.split("images/")[1] for p in paths] == [
      f"{c}/{i:03d}.png" for c in ("ant", "bee", "cat") for i in range(2)]
  assert labels == (0, 0, 1, 1, 2, 2) and sides == (10,) * 6
  config = _config(root)
  input_pipeline.save_class_names(config, str(tmp_path / "work"))
  names = json.loads((tmp_path / "work" / "class_names.json").read_text())
  assert names == {"0": "ant", "1": "bee", "2": "cat"}
  batch = next(iter(input_pipeline.create_eval_iterator(config)))
  assert batch["label"].tolist() == [0, 0, 1, 1, 2, 2, 0, 0]  # two padding copies of record 0
  assert batch["mask"].tolist() == [True] * 6 + [False] * 2


def test_loose_files_are_unlabelled(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(4):
    _write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
  batch = next(input_pipeline.create_train_iterator(_config(tmp_path, batch_size=4)))
  assert "label" not in batch and batch["image"].shape == (4, 8, 8, 3)


def test_decode_flattens_alpha_resizes_short_side_and_centre_crops():
  rgba = np.zeros((4, 12, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 4:8, 3] = 255  # only the centre third is opaque red; the rest is transparent
  data = _png_bytes(rgba, "RGBA")
  out = folder_source.decode(data, 4, 3)
  np.testing.assert_array_equal(out[..., 0], 200)
  np.testing.assert_array_equal(out[..., 1:], 0)  # the crop kept exactly the opaque centre
  grey = folder_source.decode(_png_bytes(rgba, "RGBA"), 4, 1)
  assert grey.shape == (4, 4, 1)
  tall = np.full((40, 20, 3), 90, np.uint8)
  assert folder_source.decode(_png_bytes(tall, "RGB"), 8, 3).shape == (8, 8, 3)
  white = folder_source.decode(_png_bytes(np.zeros((4, 4, 4), np.uint8), "RGBA"), 4, 3)
  np.testing.assert_array_equal(white, 255)  # fully transparent -> the white background


def _png_bytes(array, mode):
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format="PNG")
  return buffer.getvalue()


def test_shards_are_disjoint_and_cover_the_folder_on_two_processes(tmp_path):
  root = _make_folder(tmp_path / "images", per_class=8)  # 24 images
  config = _config(root, batch_size=8)
  everything = set(_keys(np.concatenate(
      [b["image"] for b in input_pipeline.create_eval_iterator(config, batch_size=24)])))
  assert len(everything) == 24
  seen, evaluated = [], collections.Counter()
  for index in range(2):
    # 12 images per shard, local batch 4: three batches are exactly one epoch.
    batches = itertools.islice(
        input_pipeline.create_train_iterator(config, shard_options=_shard(index, 2)), 3)
    seen.append(set(itertools.chain.from_iterable(_keys(b["image"]) for b in batches)))
    for batch in input_pipeline.create_eval_iterator(
        config, shard_options=_shard(index, 2, drop_remainder=False)):
      evaluated.update(k for k, m in zip(_keys(batch["image"]), batch["mask"]) if m)
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == everything
  assert evaluated == collections.Counter(everything)  # eval: each image exactly once


def test_iterator_resumes_exactly(tmp_path):
  config = _config(_make_folder(tmp_path / "images"), batch_size=8, random_flip=True)
  iterator = input_pipeline.create_train_iterator(config)
  for _ in range(2):
    next(iterator)
  state = iterator.get_state()
  expected = list(itertools.islice(iterator, 4))  # crosses the 3-batch epoch boundary
  resumed = input_pipeline.create_train_iterator(config)
  resumed.set_state(state)
  for want, have in zip(expected, itertools.islice(resumed, 4), strict=True):
    np.testing.assert_array_equal(want["image"], have["image"])
    np.testing.assert_array_equal(want["label"], have["label"])


def test_packed_and_raw_give_identical_batches(tmp_path):
  root = _make_folder(tmp_path / "images")
  metadata = pack_folder.pack(str(root), str(tmp_path / "packed"), 8, 3, shard_size=10)
  assert metadata["num_examples"] == 24 and len(metadata["shards"]) == 3
  assert metadata["classes"] == ["ant", "bee", "cat"]
  raw, packed = (_config(d, random_flip=True) for d in (root, tmp_path / "packed"))
  assert isinstance(input_pipeline.open_source(packed.data, "train"), folder_source.PackedSource)
  for a, b in zip(itertools.islice(input_pipeline.create_train_iterator(raw), 5),
                  itertools.islice(input_pipeline.create_train_iterator(packed), 5)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  for a, b in zip(input_pipeline.create_eval_iterator(raw),
                  input_pipeline.create_eval_iterator(packed), strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])
  packed.data.image_size = 16
  with pytest.raises(ValueError, match="packed at image_size=8.*pack the folder again"):
    validation.check_data(packed)


@pytest.mark.slow
def test_decoding_in_worker_processes_gives_the_same_batches(tmp_path):
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; pytest never parses them
    flags.FLAGS.mark_as_parsed()
  config = _config(_make_folder(tmp_path / "images"), random_flip=True)
  # grain deals records round-robin to the workers, which batch their own records, so batches
  # differ from the in-process order; two epochs (six batches) hold the same flipped images.
  want = itertools.islice(input_pipeline.create_train_iterator(config), 6)
  config.data.num_workers = 2
  got = itertools.islice(input_pipeline.create_train_iterator(config), 6)
  count = lambda batches: collections.Counter(k for b in batches for k in _keys(b["image"]))
  assert count(want) == count(got)


def test_missing_empty_and_imageless_folders_fail_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="is not a directory.*data_dir"):
    validation.check_data(_config(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="No image files"):
    validation.check_data(_config(tmp_path / "empty"))
  (tmp_path / "text" / "a").mkdir(parents=True)
  (tmp_path / "text" / "a" / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"No image files \(.png, .jpg"):
    validation.check_data(_config(tmp_path / "text"))


def test_mixed_class_folders_and_loose_files_fail(tmp_path):
  root = _make_folder(tmp_path / "images", per_class=1)
  _write_png(root / "stray.png", np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="mixes class subfolders with 1 loose.*stray.png"):
    validation.check_data(_config(root))


def test_corrupt_file_fails_naming_it_or_is_skipped_with_a_count(tmp_path, caplog):
  root = _make_folder(tmp_path / "images", per_class=4)
  (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(ValueError, match=r"Cannot read image .*bee/broken.png.*skip_corrupt=True"):
    validation.check_data(_config(root))
  config = _config(root, skip_corrupt=True)
  with caplog.at_level(logging.WARNING):
    validation.check_data(config)
  assert "Skipped 1 unreadable image" in caplog.text
  assert input_pipeline.num_examples(config, "train") == 12


def test_small_images_are_upscaled_with_a_counted_warning(tmp_path, caplog):
  root = _make_folder(tmp_path / "images", per_class=2)  # 6 images of 12x10
  _write_png(root / "ant" / "big.png", np.zeros((40, 40, 3), np.uint8))
  config = _config(root, image_size=16)
  with caplog.at_level(logging.WARNING):
    batch = next(input_pipeline.create_train_iterator(config))
  assert "6 image(s)" in caplog.text and "smaller than image_size=16" in caplog.text
  assert batch["image"].shape == (8, 16, 16, 3)


@pytest.mark.slow
def test_a_folder_with_class_subfolders_trains_a_few_steps(tmp_path):
  from ddpm_jax.training import train  # pylint: disable=g-import-not-at-top
  root = _make_folder(tmp_path / "images", per_class=6)
  config = tiny_config(**{"data.dataset": "folder", "data.data_dir": str(root),
                          "data.eval_split": "train", "data.num_channels": 3,
                          "training.num_train_steps": 3, "training.final_eval_metrics": (),
                          "eval.metrics": ("bpd",)})
  workdir = tmp_path / "run"
  report = train.train_and_evaluate(config, str(workdir))
  assert report["step"] == 3 and np.isfinite(report["loss"])
  names = json.loads((workdir / "class_names.json").read_text())
  assert names == {"0": "ant", "1": "bee", "2": "cat"}
