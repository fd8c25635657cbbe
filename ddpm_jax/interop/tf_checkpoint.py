"""A reader of TensorFlow's V2 checkpoints ("tensor bundles") in NumPy, without TensorFlow.

A checkpoint `<prefix>` is two kinds of file (tensorflow/core/util/tensor_bundle):
  * `<prefix>.index`: a LevelDB table (SSTable). Its footer, the last 48 bytes, holds the block
    handles (varint offset, varint size) of the metaindex and the index block and the magic
    0xdb4775248b80fb57. The index block maps separator keys to the handles of data blocks. A
    block is a run of entries (varint shared key length, varint unshared length, varint value
    length, the unshared key bytes, the value), then uint32 restart offsets and their count;
    after the block come one compression byte (TF writes 0, none) and a masked crc32c of the
    block and that byte. The key "" holds a BundleHeaderProto (num_shards, endianness), every
    other key is a tensor's name and holds its BundleEntryProto (dtype, shape, shard_id, offset,
    size, crc32c, slices).
  * `<prefix>.data-<shard:05d>-of-<num_shards:05d>`: the tensors' raw bytes, back to back. The
    entry's crc32c is the masked crc32c of those bytes, checked on every read.

The protobufs are parsed by hand (their wire format is a few varints), so nothing here needs
TensorFlow or protobuf, and nothing is ever unpickled. Numeric and bool tensors are read; string
tensors and partitioned (sliced) variables fail with a message when they are asked for.
"""

import dataclasses
import os
import re
import struct

import google_crc32c
import numpy as np

_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # compression type byte + fixed32 masked crc32c
_CRC_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto -> NumPy (little-endian; byte order fixed on read).
# bfloat16 has no NumPy dtype: it is widened to float32, which is exact.
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
           9: np.int64, 10: np.bool_, 14: "bfloat16", 17: np.uint16, 19: np.float16,
           22: np.uint32, 23: np.uint64}
_DTYPE_NAMES = {7: "string", 8: "complex64", 18: "complex128", 20: "resource", 21: "variant"}

_CKPT_NAME = re.compile(r"^(?P<base>.+)-(?P<step>\d+)\.index$")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked: corrupt, truncated or of an unsupported kind."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one tensor lives, from its BundleEntryProto."""
  dtype_enum: int
  shape: tuple[int, ...]
  shard_id: int
  offset: int
  size: int
  crc32c: int | None  # masked, as stored
  sliced: bool


# ----- protobuf wire format -----

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise CheckpointError("truncated varint in the checkpoint index")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise CheckpointError("malformed varint in the checkpoint index")


def _fields(buf: bytes) -> dict[int, list]:
  """Field number -> values of a serialized protobuf message (ints or bytes by wire type)."""
  out: dict[int, list] = {}
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
    elif wire == 2:
      length, pos = _varint(buf, pos)
      value, pos = bytes(buf[pos:pos + length]), pos + length
    elif wire == 5:
      value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
    else:
      raise CheckpointError(f"unsupported protobuf wire type {wire} in the checkpoint index")
    if pos > len(buf):
      raise CheckpointError("truncated protobuf message in the checkpoint index")
    out.setdefault(number, []).append(value)
  return out


def _signed64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _parse_entry(name: str, buf: bytes) -> Entry:
  f = _fields(buf)
  dims = []
  for shape_msg in f.get(2, []):
    shape = _fields(shape_msg)
    if shape.get(3, [0])[-1]:
      raise CheckpointError(f"tensor {name!r} has an unknown rank")
    dims = [_signed64(_fields(d).get(1, [0])[-1]) for d in shape.get(2, [])]
  return Entry(dtype_enum=f.get(1, [0])[-1], shape=tuple(dims), shard_id=f.get(3, [0])[-1],
               offset=f.get(4, [0])[-1], size=f.get(5, [0])[-1],
               crc32c=f[6][-1] if 6 in f else None, sliced=bool(f.get(7)))


# ----- the SSTable -----

def _unmask(masked: int) -> int:
  rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
  return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _block(data: bytes, offset: int, size: int, path: str) -> bytes:
  end = offset + size
  if end + _BLOCK_TRAILER_SIZE > len(data):
    raise CheckpointError(f"{path}: a block runs past the end of the file (truncated?)")
  block = data[offset:end]
  kind = data[end]
  if kind != 0:
    raise CheckpointError(f"{path}: block compressed with type {kind} (1 = snappy); TensorFlow "
                          "writes checkpoint indexes uncompressed and only those are supported")
  (masked,) = struct.unpack_from("<I", data, end + 1)
  if google_crc32c.value(data[offset:end + 1]) != _unmask(masked):
    raise CheckpointError(f"{path}: checksum mismatch in the block at byte {offset} (corrupt)")
  return block


def _block_entries(block: bytes, path: str):
  """Yields (key, value) of one block, undoing the prefix compression of the keys."""
  if len(block) < 4:
    raise CheckpointError(f"{path}: block too short")
  (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
  limit = len(block) - 4 - 4 * num_restarts
  if limit < 0:
    raise CheckpointError(f"{path}: malformed block (restart array)")
  pos, key = 0, b""
  while pos < limit:
    shared, pos = _varint(block, pos)
    unshared, pos = _varint(block, pos)
    value_len, pos = _varint(block, pos)
    if shared > len(key) or pos + unshared + value_len > limit:
      raise CheckpointError(f"{path}: malformed block entry")
    key = key[:shared] + block[pos:pos + unshared]
    pos += unshared
    yield key, block[pos:pos + value_len]
    pos += value_len


def _handle(buf: bytes, pos: int = 0) -> tuple[tuple[int, int], int]:
  offset, pos = _varint(buf, pos)
  size, pos = _varint(buf, pos)
  return (offset, size), pos


def _read_table(path: str) -> list[tuple[bytes, bytes]]:
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < _FOOTER_SIZE:
    raise CheckpointError(f"{path}: too short to be a checkpoint index")
  footer = data[-_FOOTER_SIZE:]
  (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
  if magic != _MAGIC:
    raise CheckpointError(f"{path}: not a TensorFlow V2 checkpoint index (bad magic number); "
                          "V1 checkpoints (a single model.ckpt file) are not supported")
  _, pos = _handle(footer)  # the metaindex: TF's checkpoint indexes keep no filters in it
  (index_offset, index_size), _ = _handle(footer, pos)
  items = []
  for _, handle in _block_entries(_block(data, index_offset, index_size, path), path):
    (offset, size), _ = _handle(handle)
    items.extend(_block_entries(_block(data, offset, size, path), path))
  return items


# ----- checkpoints -----

def resolve_checkpoint(path: str) -> tuple[str, int | None]:
  """A checkpoint prefix and its step from a prefix or a directory.

  A directory resolves to the checkpoint its TF `checkpoint` file names (`model_checkpoint_path`;
  absolute or cloud paths written at training time are looked up by their base name in the
  directory), else to the `<name>-<step>.index` with the largest step.

  Args:
    path: `<dir>/model.ckpt-<step>` (the files' common prefix) or a directory holding one.

  Returns:
    (prefix, step), step parsed from the `-<step>` suffix or None when there is none.

  Raises:
    FileNotFoundError: neither a prefix with an `.index` file nor a directory holding one.
  """
  path = os.fspath(path)
  if os.path.isfile(path + ".index"):
    return path, _step_of(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no TF checkpoint at {path!r}: expected a prefix with a "
                            f"{os.path.basename(path)}.index file, or a directory holding one")
  state = os.path.join(path, "checkpoint")
  if os.path.isfile(state):
    with open(state, encoding="utf-8") as f:
      match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', f.read(), re.MULTILINE)
    if match:
      named = match.group(1)
      for candidate in (named, os.path.join(path, named),
                        os.path.join(path, re.split(r"[/\\]", named)[-1])):
        if os.path.isfile(candidate + ".index"):
          return candidate, _step_of(candidate)
  found = []
  for name in os.listdir(path):
    match = _CKPT_NAME.match(name)
    if match:
      found.append((int(match.group("step")), os.path.join(path, name[:-len(".index")])))
  if not found:
    raise FileNotFoundError(f"no TF checkpoint in {path!r}: no <name>-<step>.index file")
  step, prefix = max(found)
  return prefix, step


def _step_of(prefix: str) -> int | None:
  match = re.search(r"-(\d+)$", prefix)
  return int(match.group(1)) if match else None


def _read_index(prefix: str) -> tuple[dict[int, list], dict[str, Entry]]:
  header, entries = None, {}
  for key, value in _read_table(prefix + ".index"):
    if key == b"":
      header = _fields(value)
    else:
      name = key.decode("utf-8")
      entries[name] = _parse_entry(name, value)
  if header is None:
    raise CheckpointError(f"{prefix}.index has no bundle header (not a tensor bundle)")
  if header.get(2, [0])[-1] not in (0, 1):
    raise CheckpointError(f"{prefix}.index: unknown endianness {header[2][-1]}")
  return header, entries


def _dtype(name: str, entry: Entry):
  dtype = _DTYPES.get(entry.dtype_enum)
  if dtype is None:
    kind = _DTYPE_NAMES.get(entry.dtype_enum, f"DataType {entry.dtype_enum}")
    raise CheckpointError(f"tensor {name!r} has dtype {kind}, which this reader does not read "
                          "(supported: float16/32/64, bfloat16, (u)int8-64, bool)")
  return dtype


def list_variables(path: str) -> dict[str, tuple[np.dtype | None, tuple[int, ...]]]:
  """Every tensor of a checkpoint: name -> (NumPy dtype, shape), reading only the index.

  The dtype is None for a tensor this reader cannot read (a string, say); bfloat16 is listed as
  float32, as `read_variables` returns it.

  Args:
    path: a checkpoint prefix or a directory holding one (see `resolve_checkpoint`).
  """
  prefix, _ = resolve_checkpoint(path)
  _, entries = _read_index(prefix)
  out = {}
  for name, entry in sorted(entries.items()):
    dtype = _DTYPES.get(entry.dtype_enum)
    out[name] = (None if dtype is None else np.dtype(np.float32 if dtype == "bfloat16" else dtype),
                 entry.shape)
  return out


def read_variables(path: str, names=None) -> dict[str, np.ndarray]:
  """Reads tensors of a checkpoint, checking each one's size and crc32c.

  Args:
    path: a checkpoint prefix or a directory holding one (see `resolve_checkpoint`).
    names: the tensors to read (None: all of them).

  Returns:
    name -> NumPy array in native byte order (bfloat16 widened exactly to float32).

  Raises:
    KeyError: a requested name is not in the checkpoint.
    CheckpointError: a data file is missing, truncated or corrupt, or a tensor is of a kind
      this reader does not read (string, sliced).
  """
  prefix, _ = resolve_checkpoint(path)
  header, entries = _read_index(prefix)
  names = sorted(entries) if names is None else list(names)
  missing = [n for n in names if n not in entries]
  if missing:
    raise KeyError(f"{prefix}: no tensor named {missing[0]!r}"
                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  big_endian = header.get(2, [0])[-1] == 1
  num_shards = header.get(1, [1])[-1]
  out, files = {}, {}
  try:
    for name in names:
      entry = entries[name]
      dtype = _dtype(name, entry)
      if entry.sliced:
        raise CheckpointError(f"tensor {name!r} is stored as slices (a partitioned variable); "
                              "this reader reads whole tensors only")
      if entry.shard_id not in files:
        data_path = f"{prefix}.data-{entry.shard_id:05d}-of-{num_shards:05d}"
        if not os.path.isfile(data_path):
          raise CheckpointError(f"missing checkpoint data file {data_path}")
        files[entry.shard_id] = open(data_path, "rb")  # closed below
      out[name] = _read_tensor(files[entry.shard_id], name, entry, dtype, big_endian)
  finally:
    for f in files.values():
      f.close()
  return out


def _read_tensor(f, name: str, entry: Entry, dtype, big_endian: bool) -> np.ndarray:
  count = int(np.prod(entry.shape, dtype=np.int64))
  itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
  if count * itemsize != entry.size:
    raise CheckpointError(f"tensor {name!r}: the index gives {entry.size} bytes for shape "
                          f"{entry.shape} of {count * itemsize} bytes (corrupt index)")
  f.seek(entry.offset)
  buf = f.read(entry.size)
  if len(buf) != entry.size:
    raise CheckpointError(f"tensor {name!r}: {f.name} ends after {len(buf)} of its {entry.size} "
                          "bytes (truncated data file)")
  if entry.crc32c is not None and google_crc32c.value(buf) != _unmask(entry.crc32c):
    raise CheckpointError(f"tensor {name!r}: crc32c mismatch in {f.name} (corrupt data file)")
  order = ">" if big_endian else "<"
  if dtype == "bfloat16":
    bits = np.frombuffer(buf, np.dtype(order + "u2")).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(entry.shape)
  array = np.frombuffer(buf, np.dtype(dtype).newbyteorder(order))
  return array.astype(np.dtype(dtype)).reshape(entry.shape)  # a writable, native-order copy
