"""One-time packer: a folder of images -> ArrayRecord shards of decoded, resized uint8 images.

Decoding JPEGs on every epoch costs more CPU than a pod host can spare; the packed form is read
with no decoding at all. Records keep the folder's order and labels, so `data.dataset="folder"`
gives the same batches from either form. No TensorFlow is needed.

  python -m ddpm_jax.pack_folder --src=DIR --out=PACKED --image_size=32 --num_channels=3
  python -m ddpm_jax.pack_folder --export_digits=DIR   # sklearn digits as class-folder PNGs

(the command line is `ddpm_jax/pack_folder.py`; this module is the library).

Output: PACKED/data-00000-of-0000N.array_record ... and PACKED/metadata.json
({format, image_size, num_channels, num_examples, classes, shards, source}).
"""

import json

from absl import logging
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from ddpm_jax.data import digits
from ddpm_jax.data import folder_source


def pack(src: str, out: str, image_size: int, num_channels: int, shard_size: int = 10_000,
         skip_corrupt: bool = False) -> dict:
  """Packs `src` into `out` (see module docstring); returns the metadata written."""
  source = folder_source.FolderSource(src, image_size, num_channels, skip_corrupt)
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  num_shards = max(1, -(-len(source) // shard_size))
  shards = [f"data-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
  for shard_index, name in enumerate(shards):
    # group_size:1 keeps random access to one record cheap (grain reads records one by one).
    writer = array_record_module.ArrayRecordWriter(str(out_dir / name), "group_size:1")
    for index in range(shard_index * shard_size, min(len(source), (shard_index + 1) * shard_size)):
      record = source[index]
      writer.write(folder_source.encode_record(record["image"], int(record.get("label", 0))))
    writer.close()
    logging.info("Wrote %s.", out_dir / name)
  metadata = {"format": folder_source.PACKED_FORMAT, "image_size": image_size,
              "num_channels": num_channels, "num_examples": len(source),
              "classes": source.classes, "shards": shards, "source": src}
  (out_dir / folder_source.PACKED_METADATA).write_text(json.dumps(metadata, indent=1))
  return metadata


def export_digits(out: str) -> int:
  """Writes the digits train split as out/<digit>/<index>.png; returns the image count."""
  images, labels = digits.load_digits_arrays("train")
  for index, (image, label) in enumerate(zip(images, labels)):
    path = epath.Path(out) / str(label) / f"{index:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      Image.fromarray(image[..., 0]).save(f, format="PNG")
  return len(images)
