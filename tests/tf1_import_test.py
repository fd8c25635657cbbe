"""Tests of the TF1 checkpoint reader and of DDPM's TF1 layout on our U-Net.

The fixture tests/fixtures/tf1_tiny was written once by TensorFlow (make_tf1_checkpoint.py): a
tiny DDPM U-Net under `model/` with EMA shadows, Adam slots and global_step, plus TF's own view
of it and TF's forward pass (reference.npz). Negative cases rewrite it with `_write_bundle`, a
minimal tensor-bundle writer kept here for that purpose only.
"""

import hashlib
import json
import os
import shutil
import struct

import google_crc32c
import numpy as np
import pytest

from ddpm_jax import models
from ddpm_jax.interop import tf1_layout
from ddpm_jax.interop import tf_checkpoint

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf1_tiny")
PREFIX = os.path.join(FIXTURE, "model.ckpt-1000")
IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def reference():
  with np.load(os.path.join(FIXTURE, "reference.npz"), allow_pickle=False) as ref:
    return {k: ref[k] for k in ref.files}


@pytest.fixture(scope="module")
def tensors():
  return tf_checkpoint.read_variables(PREFIX)


# ----- a minimal writer (LevelDB table + raw data), for the negative cases -----

_ENUMS = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
          np.dtype(np.int64): 9, np.dtype(np.bool_): 10, np.dtype(np.float16): 19}


def _varint(value):
  out = bytearray()
  while True:
    out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
    value >>= 7
    if not value:
      return bytes(out)


def _field(number, value):
  if isinstance(value, bytes):
    return _varint(number << 3 | 2) + _varint(len(value)) + value
  return _varint(number << 3) + _varint(value)


def _mask(crc):
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _block(items, compression=0):
  body, restarts = bytearray(), []
  for key, value in items:
    restarts.append(len(body))
    body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
  body += b"".join(struct.pack("<I", r) for r in restarts or [0])
  body += struct.pack("<I", len(restarts) or 1)
  kind = bytes([compression])
  return bytes(body) + kind + struct.pack("<I", _mask(google_crc32c.value(bytes(body) + kind)))


def _write_bundle(prefix, arrays, raw=None, compression=0):
  """Writes arrays ({name: ndarray}) and raw entries ({name: (dtype enum, shape, bytes, sliced)})
  as a one-shard TF V2 checkpoint at `prefix`."""
  raw = dict(raw or {})
  for name, array in arrays.items():
    array = np.asarray(array)
    raw[name] = (_ENUMS[array.dtype], array.shape, array.astype(array.dtype.newbyteorder("<"))
                 .tobytes(), False)
  data, entries = bytearray(), [(b"", _field(1, 1) + _field(3, _field(1, 1)))]
  for name in sorted(raw):
    enum, shape, buf, sliced = raw[name]
    shape_msg = b"".join(_field(2, _field(1, d)) for d in shape)
    entry = (_field(1, enum) + _field(2, shape_msg) + _field(4, len(data)) + _field(5, len(buf))
             + _varint(6 << 3 | 5) + struct.pack("<I", _mask(google_crc32c.value(bytes(buf)))))
    if sliced:
      entry += _field(7, _field(1, 0))
    entries.append((name.encode(), entry))
    data += buf
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.write(data)
  data_block = _block(entries, compression)
  meta_block = _block([])
  handle = lambda offset, size: _varint(offset) + _varint(size)
  index_block = _block([(entries[-1][0], handle(0, len(data_block) - 5))])
  meta_at = len(data_block)
  index_at = meta_at + len(meta_block)
  footer = handle(meta_at, len(meta_block) - 5) + handle(index_at, len(index_block) - 5)
  footer = footer.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
  with open(prefix + ".index", "wb") as f:
    f.write(data_block + meta_block + index_block + footer)


# ----- the reader -----

def test_reader_sees_what_tensorflow_wrote(reference, tensors):
  names = [str(n) for n in reference["names"]]
  listed = tf_checkpoint.list_variables(PREFIX)
  assert sorted(listed) == names == sorted(tensors)
  shapes = json.loads(str(reference["shapes"]))
  for name, dtype, digest in zip(names, reference["dtypes"], reference["sha256"]):
    assert listed[name] == (np.dtype(str(dtype)), tuple(shapes[name])), name
    assert tensors[name].dtype == np.dtype(str(dtype)) and tensors[name].shape == listed[name][1]
    assert hashlib.sha256(tensors[name].tobytes()).hexdigest() == digest, name
  for i, name in enumerate(reference["value_names"]):
    np.testing.assert_array_equal(tensors[str(name)], reference[f"value_{i}"])
  # Like DDPM's checkpoints: optimiser slots, EMA shadows and the step beside the model.
  assert "global_step" in listed and "model/temb/dense0/W/Adam_1" in listed
  assert "model/conv_out/W/ExponentialMovingAverage" in listed
  assert int(tensors["global_step"]) == 1000


def test_read_subset_and_unknown_name():
  out = tf_checkpoint.read_variables(PREFIX, ["model/conv_out/b"])
  assert list(out) == ["model/conv_out/b"] and out["model/conv_out/b"].shape == (3,)
  with pytest.raises(KeyError, match="model/nope"):
    tf_checkpoint.read_variables(PREFIX, ["model/nope"])


def test_resolve_checkpoint(tmp_path):
  assert tf_checkpoint.resolve_checkpoint(FIXTURE) == (PREFIX, 1000)
  assert tf_checkpoint.resolve_checkpoint(PREFIX) == (PREFIX, 1000)
  # The `checkpoint` file of a training run names paths of its own machine or bucket.
  for name in os.listdir(FIXTURE):
    if name.startswith("model.ckpt-1000"):
      os.symlink(os.path.join(FIXTURE, name), tmp_path / name)
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "gs://b/run/model.ckpt-1000"\n')
  (tmp_path / "model.ckpt-2000.index").write_bytes(b"")  # the `checkpoint` file wins over it
  assert tf_checkpoint.resolve_checkpoint(str(tmp_path)) == (str(tmp_path / "model.ckpt-1000"),
                                                             1000)
  # Without a `checkpoint` file: the largest step, not the latest name.
  steps = tmp_path / "steps"
  steps.mkdir()
  for step in (900, 10000, 2000):
    (steps / f"model.ckpt-{step}.index").write_bytes(b"")
  assert tf_checkpoint.resolve_checkpoint(str(steps)) == (str(steps / "model.ckpt-10000"), 10000)
  with pytest.raises(FileNotFoundError, match="no TF checkpoint"):
    tf_checkpoint.resolve_checkpoint(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="no TF checkpoint"):
    tf_checkpoint.resolve_checkpoint(str(tmp_path / "steps" / "model.ckpt-5"))


def test_dtypes_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"f16": rng.normal(size=(2, 3)).astype(np.float16), "f64": rng.normal(size=(4,)),
            "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3), "i64": np.int64(-2**40),
            "b": np.array([True, False, True]), "f32": np.float32(1.5)}
  bf16 = np.array([1.0, -2.5, 3.140625], np.float32)
  raw = {"bf16": (14, (3,), (bf16.view(np.uint32) >> 16).astype("<u2").tobytes(), False),
         "s": (7, (), b"\x03abc", False), "sliced": (1, (4,), b"", True)}
  _write_bundle(str(tmp_path / "c"), arrays, raw)
  listed = tf_checkpoint.list_variables(str(tmp_path / "c"))
  assert listed["s"] == (None, ()) and listed["bf16"] == (np.dtype(np.float32), (3,))
  out = tf_checkpoint.read_variables(str(tmp_path / "c"), [*arrays, "bf16"])
  for name, array in arrays.items():
    assert out[name].dtype == np.asarray(array).dtype
    np.testing.assert_array_equal(out[name], array)
  np.testing.assert_array_equal(out["bf16"], bf16)
  with pytest.raises(tf_checkpoint.CheckpointError, match="'s' has dtype string"):
    tf_checkpoint.read_variables(str(tmp_path / "c"), ["s"])
  with pytest.raises(tf_checkpoint.CheckpointError, match="slices"):
    tf_checkpoint.read_variables(str(tmp_path / "c"), ["sliced"])


def _copy_fixture(tmp_path):
  for name in os.listdir(FIXTURE):
    if name.startswith("model.ckpt-1000"):
      shutil.copy(os.path.join(FIXTURE, name), tmp_path / name)
  return str(tmp_path / "model.ckpt-1000")


def test_truncated_or_corrupt_data_fails(tmp_path, tensors):
  prefix = _copy_fixture(tmp_path)
  data = prefix + ".data-00000-of-00001"
  size = os.path.getsize(data)
  with open(data, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(tf_checkpoint.CheckpointError, match="truncated data file"):
    tf1_layout.load(prefix, ema=True)
  with open(data, "r+b") as f:
    f.truncate(0)
    f.write(b"\0" * size)
  with pytest.raises(tf_checkpoint.CheckpointError, match="crc32c mismatch"):
    tf1_layout.load(prefix, ema=False)
  os.remove(data)
  with pytest.raises(tf_checkpoint.CheckpointError, match="missing checkpoint data file"):
    tf_checkpoint.read_variables(prefix, ["global_step"])


def test_corrupt_or_foreign_index_fails(tmp_path, tensors):
  prefix = str(tmp_path / "c")
  _write_bundle(prefix, {"global_step": tensors["global_step"]}, compression=1)
  with pytest.raises(tf_checkpoint.CheckpointError, match="compressed with type 1"):
    tf_checkpoint.list_variables(prefix)
  with open(prefix + ".index", "wb") as f:
    f.write(b"\0" * 64)
  with pytest.raises(tf_checkpoint.CheckpointError, match="bad magic"):
    tf_checkpoint.list_variables(prefix)
  index = _copy_fixture(tmp_path) + ".index"
  with open(index, "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(tf_checkpoint.CheckpointError, match="checksum mismatch"):
    tf_checkpoint.list_variables(index[:-len(".index")])


# ----- the layout -----

def _unet(arch):
  return models.UNet(ch=arch["ch"], ch_mult=arch["ch_mult"], num_res_blocks=arch["num_res_blocks"],
                     attn_resolutions=tuple(IMAGE_SIZE // 2**lv for lv in arch["attn_levels"]),
                     dropout=0.0, resamp_with_conv=arch["resamp_with_conv"],
                     out_channels=arch["out_channels"], num_groups=32)


@pytest.mark.parametrize("ema", [True, False])
def test_load_matches_tensorflow_forward_pass(reference, ema):
  params, arch = tf1_layout.load(FIXTURE, ema=ema)
  expected_arch = json.loads(str(reference["arch"]))
  assert arch == {k: tuple(v) if isinstance(v, list) else v for k, v in expected_arch.items()}
  leaves = [leaf for leaf in _leaves(params)]
  assert leaves and all(leaf.dtype == np.float32 for leaf in leaves)
  out = np.asarray(_unet(arch).apply({"params": params}, reference["x"], reference["t"],
                                     train=False))
  want = reference["out_ema" if ema else "out_raw"]
  assert out.shape == want.shape
  assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else [value])


def test_ema_and_raw_differ(reference):
  ema, _ = tf1_layout.load(PREFIX, ema=True)
  raw, _ = tf1_layout.load(PREFIX, ema=False)
  for a, b in zip(_leaves(ema), _leaves(raw)):
    assert a.shape == b.shape and not np.array_equal(a, b)
  assert not np.allclose(reference["out_ema"], reference["out_raw"], atol=1e-2)


def test_published_layouts():
  """The variables of DDPM's published networks (as the fixture script's TF code makes them)
  give their architectures and fill our tree exactly; checked from shapes only."""
  with open(os.path.join(FIXTURE, "layouts.json"), encoding="utf-8") as f:
    layouts = json.load(f)
  want = {"cifar10": ((1, 2, 2, 2), (1,)), "lsun_celebahq_256": ((1, 1, 2, 2, 4, 4), (4,))}
  for key, (ch_mult, attn_levels) in want.items():
    variables = {n: (np.dtype(np.float32), tuple(s)) for n, s in layouts[key].items()}
    variables.update({n + tf1_layout.EMA_SUFFIX: v for n, v in variables.items()})
    variables["global_step"] = (np.dtype(np.int64), ())
    arch, sources = tf1_layout.plan(variables, ema=True)
    assert arch == {"ch": 128, "ch_mult": ch_mult, "num_res_blocks": 2,
                    "attn_levels": attn_levels, "resamp_with_conv": True, "in_channels": 3,
                    "out_channels": 3}
    assert sorted(name for name, _ in sources.values()) == sorted(
        n + tf1_layout.EMA_SUFFIX for n in layouts[key])
  cifar_params = sum(np.prod(s) for s in layouts["cifar10"].values())
  assert cifar_params == 35_746_307  # DDPM's CIFAR-10 model, as the paper and diffusers count


def _rewrite(tmp_path, tensors, drop=(), replace=None):
  arrays = {n: a for n, a in tensors.items() if n not in drop}
  arrays.update(replace or {})
  prefix = str(tmp_path / "model.ckpt-7")
  _write_bundle(prefix, arrays)
  return prefix


def test_writer_round_trips_the_fixture(tmp_path, tensors):
  prefix = _rewrite(tmp_path, tensors)
  assert tf_checkpoint.list_variables(prefix) == tf_checkpoint.list_variables(PREFIX)
  params, _ = tf1_layout.load(prefix, ema=True)
  want, _ = tf1_layout.load(PREFIX, ema=True)
  for a, b in zip(_leaves(params), _leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_missing_variable_is_named(tmp_path, tensors):
  prefix = _rewrite(tmp_path, tensors, drop=["model/mid/attn_1/q/b"])
  with pytest.raises(ValueError, match=r"missing variable model/mid/attn_1/q/b \(our mid_attn/q/"
                                       r"bias, shape \(32,\)\)"):
    tf1_layout.load(prefix, ema=False)
  prefix = _rewrite(tmp_path, tensors, drop=["model/conv_in/W"])
  with pytest.raises(ValueError, match="no variable model/conv_in/W"):
    tf1_layout.load(prefix, ema=False)


def test_missing_ema_shadow_is_named(tmp_path, tensors):
  shadow = "model/up_1/attn_1/proj_out/W/ExponentialMovingAverage"
  prefix = _rewrite(tmp_path, tensors, drop=[shadow])
  with pytest.raises(ValueError, match=f"no EMA shadow {shadow}.*--noema"):
    tf1_layout.load(prefix, ema=True)
  tf1_layout.load(prefix, ema=False)  # the raw weights are all there


def test_shape_mismatch_names_both_shapes(tmp_path, tensors):
  name = "model/down_1/block_0/conv2/W"
  prefix = _rewrite(tmp_path, tensors, replace={name: np.zeros((3, 3, 32, 31), np.float32)})
  with pytest.raises(ValueError, match=rf"{name} has shape \(3, 3, 32, 31\) in the checkpoint, "
                                       r"our U-Net .* expects \(3, 3, 32, 32\)"):
    tf1_layout.load(prefix, ema=False)
  shadow = name + tf1_layout.EMA_SUFFIX
  prefix = _rewrite(tmp_path, tensors, replace={shadow: np.zeros((3, 3, 32, 31), np.float32)})
  with pytest.raises(ValueError, match=f"EMA shadow {shadow} has shape"):
    tf1_layout.load(prefix, ema=True)


def test_unused_and_foreign_variables_fail(tmp_path, tensors):
  extra = "model/down_0/block_0/conv_shortcut/W"
  prefix = _rewrite(tmp_path, tensors, replace={extra: np.zeros((3, 3, 32, 32), np.float32)})
  with pytest.raises(ValueError, match=f"no place for: {extra}"):
    tf1_layout.load(prefix, ema=False)
  prefix = _rewrite(tmp_path, {"global_step": tensors["global_step"],
                               "net/conv_in/W": tensors["model/conv_in/W"]})
  with pytest.raises(ValueError, match="no variables under 'model/'.*net/conv_in/W"):
    tf1_layout.load(prefix, ema=False)
  with pytest.raises(FileNotFoundError):
    tf1_layout.load(str(tmp_path / "nothing"), ema=True)
