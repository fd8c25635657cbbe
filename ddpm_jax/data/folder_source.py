"""Your own images as a grain random-access source: a folder of PNG/JPEG/WebP, or its packed form.

`open_folder(data_dir, image_size, num_channels, skip_corrupt)` returns a source whose records
are {'image': uint8 [S, S, C]} plus 'label': int32 when the images sit in class subfolders. The
input pipeline treats it like any tfds source (sampler, sharding, flips, checkpointed position),
so only reading and decoding live here. Records are decoded in `__getitem__`, i.e. in grain's
worker processes when data.num_workers > 0.

Layout rules (checked once, before anything compiles):
  * files are found recursively; order is the sorted relative POSIX path (deterministic);
  * either every image sits in a top-level subfolder (classes: sorted names -> 0..K-1) or none
    does (unlabelled); a mix is an error;
  * a directory holding `metadata.json` written by `ddpm_jax.pack_folder` is the packed form:
    ArrayRecord shards of decoded, resized images in the same order, read at full speed.

Preprocessing: Pillow decode; RGBA/LA/palette transparency flattened onto white; convert to
L or RGB; resize so that the short side is S (bicubic with antialiasing); centre crop S x S.
"""

import functools
import io
import json
from typing import Any

from absl import logging
from etils import epath
import grain
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PACKED_METADATA = "metadata.json"
PACKED_FORMAT = "ddpm_jax.packed_folder.v1"
_MODES = {1: "L", 3: "RGB"}


class FolderError(ValueError):
  """The image folder cannot be used as configured; the message says how to fix it."""


def decode(data: bytes, image_size: int, num_channels: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [image_size, image_size, num_channels] (see module doc)."""
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and
                                               "transparency" in image.info):
      rgba = image.convert("RGBA")
      image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      image.alpha_composite(rgba)
    image = image.convert(_MODES[num_channels])
    width, height = image.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    if (new_w, new_h) != (width, height):
      # reducing_gap=None: exact antialiased bicubic (PIL widens the kernel when shrinking).
      image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, np.uint8).reshape(image_size, image_size, num_channels)


def _read(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def _walk(directory: epath.Path):
  """Every non-hidden file below `directory` (epath refuses `**` globs on gs://)."""
  for path in directory.iterdir():
    if path.name.startswith("."):
      continue
    if path.is_dir():
      yield from _walk(path)
    else:
      yield path


@functools.cache
def scan(data_dir: str, skip_corrupt: bool) -> tuple[tuple[str, ...], tuple[int, ...] | None,
                                                     tuple[str, ...], tuple[int, ...]]:
  """Finds and checks every image under `data_dir`.

  Returns:
    (paths, labels or None, class names, each image's short side).

  Raises:
    FolderError: missing/empty folder, no images, mixed layout, or (unless skip_corrupt) a
      file Pillow cannot read.
  """
  root = epath.Path(data_dir)
  if not data_dir or not root.is_dir():
    raise FolderError(f"data.data_dir={data_dir!r} is not a directory; point "
                      "--config.data.data_dir at a folder of images (local or gs://).")
  files = sorted((p for p in _walk(root) if p.suffix.lower() in IMAGE_SUFFIXES),
                 key=lambda p: p.relative_to(root).as_posix())
  if not files:
    raise FolderError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) under {data_dir!r} "
                      "(searched recursively).")
  rel = [p.relative_to(root).parts for p in files]
  loose = [f.as_posix() for f, r in zip(files, rel) if len(r) == 1]
  if loose and len(loose) < len(files):
    raise FolderError(
        f"{data_dir!r} mixes class subfolders with {len(loose)} loose image(s) such as "
        f"{loose[0]!r}; move the loose files into a class folder, or all images out of them.")
  paths, labels, sides, bad = [], [], [], []
  classes = sorted({r[0] for r in rel}) if not loose else []
  for path, parts in zip(files, rel):
    try:
      with Image.open(path.open("rb")) as image:
        size = image.size
        image.verify()
    except Exception as e:  # Pillow raises many types for unreadable data.
      if not skip_corrupt:
        raise FolderError(f"Cannot read image {path.as_posix()!r} ({e}); fix or remove it, or "
                          "set --config.data.skip_corrupt=True to skip unreadable files.") from e
      bad.append(path.as_posix())
      continue
    paths.append(path.as_posix())
    if classes:
      labels.append(classes.index(parts[0]))
    sides.append(min(size))
  if bad:
    logging.warning("Skipped %d unreadable image(s) under %s, e.g. %s.", len(bad), data_dir,
                    bad[0])
  if not paths:
    raise FolderError(f"Every image under {data_dir!r} is unreadable.")
  return (tuple(paths), tuple(labels) if classes else None, tuple(classes), tuple(sides))


class FolderSource:
  """Random access over the decoded images of a folder (grain RandomAccessDataSource)."""

  def __init__(self, data_dir: str, image_size: int, num_channels: int, skip_corrupt: bool):
    paths, labels, classes, _ = scan(data_dir, skip_corrupt)
    self._paths, self._labels, self.classes = paths, labels, list(classes)
    self._size, self._channels, self._dir = image_size, num_channels, data_dir

  def __len__(self) -> int:
    return len(self._paths)

  def __repr__(self) -> str:  # grain checks it on restore: name the data, not the object
    return (f"FolderSource(dir={self._dir!r}, len={len(self)}, size={self._size}, "
            f"channels={self._channels})")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image = decode(_read(self._paths[index]), self._size, self._channels)
    if self._labels is None:
      return {"image": image}
    return {"image": image, "label": np.asarray(self._labels[index], np.int32)}


class PackedSource:
  """Random access over `ddpm_jax.pack_folder` ArrayRecord shards (no decoding)."""

  def __init__(self, data_dir: str, metadata: dict[str, Any]):
    root = epath.Path(data_dir)
    self._records = grain.sources.ArrayRecordDataSource(
        [str(root / shard) for shard in metadata["shards"]])
    self._shape = (metadata["image_size"],) * 2 + (metadata["num_channels"],)
    self.classes, self._dir = list(metadata["classes"]), data_dir
    self._labelled = bool(self.classes)

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return f"PackedSource(dir={self._dir!r}, len={len(self)}, shape={self._shape})"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._records[index]
    image = np.frombuffer(record, np.uint8, offset=4).reshape(self._shape)
    if not self._labelled:
      return {"image": image}
    return {"image": image, "label": np.frombuffer(record, "<i4", count=1)[0].astype(np.int32)}


def encode_record(image: np.ndarray, label: int) -> bytes:
  """The packed record: int32 little-endian label, then the raw uint8 HWC pixels."""
  return np.asarray(label, "<i4").tobytes() + np.ascontiguousarray(image, np.uint8).tobytes()


def packed_metadata(data_dir: str) -> dict[str, Any] | None:
  path = epath.Path(data_dir) / PACKED_METADATA if data_dir else None
  if path is None or not path.exists():
    return None
  metadata = json.loads(path.read_text())
  return metadata if metadata.get("format") == PACKED_FORMAT else None


def open_folder(data_dir: str, image_size: int, num_channels: int,
                skip_corrupt: bool = False) -> FolderSource | PackedSource:
  """The packed form if `data_dir` holds one, else the raw folder (see module docstring).

  Raises:
    FolderError: see `scan`; or a packed form built for another image size / channel count.
  """
  if num_channels not in _MODES:
    raise FolderError(f"data.num_channels={num_channels}; valid choices: {sorted(_MODES)}.")
  metadata = packed_metadata(data_dir)
  if metadata is not None:
    packed = (metadata["image_size"], metadata["num_channels"])
    if packed != (image_size, num_channels):
      raise FolderError(
          f"{data_dir!r} was packed at image_size={packed[0]}, num_channels={packed[1]} but the "
          f"config asks for {image_size}, {num_channels}; set --config.data.image_size="
          f"{packed[0]} --config.data.num_channels={packed[1]} or pack the folder again.")
    return PackedSource(data_dir, metadata)
  source = FolderSource(data_dir, image_size, num_channels, skip_corrupt)
  small = sum(side < image_size for side in scan(data_dir, skip_corrupt)[3])
  if small:
    _warn_small(data_dir, image_size, small)
  return source


@functools.cache  # once per folder and size, however often the splits are opened
def _warn_small(data_dir: str, image_size: int, count: int) -> None:
  logging.warning("%d image(s) under %s are smaller than image_size=%d and will be upscaled.",
                  count, data_dir, image_size)


def write_class_names(source: Any, workdir: str) -> None:
  """Writes `workdir/class_names.json` ({"0": name, ...}) for a labelled folder source."""
  classes = getattr(source, "classes", None)
  if classes:
    path = epath.Path(workdir) / "class_names.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(i): name for i, name in enumerate(classes)}, indent=1))
