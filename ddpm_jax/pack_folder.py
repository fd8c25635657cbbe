"""One-time packer: a folder of images -> ArrayRecord shards of decoded, resized uint8 images.

Decoding JPEGs on every epoch costs more CPU than a pod host can spare; the packed form is read
with no decoding at all. Records keep the folder's order and labels, so `data.dataset="folder"`
gives the same batches from either form. No TensorFlow is needed.

  python -m ddpm_jax.pack_folder --src=DIR --out=PACKED --image_size=32 --num_channels=3
  python -m ddpm_jax.pack_folder --export_digits=DIR   # sklearn digits as class-folder PNGs

Output: PACKED/data-00000-of-0000N.array_record ... and PACKED/metadata.json
({format, image_size, num_channels, num_examples, classes, shards, source}).
"""

import json

from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from ddpm_jax import folder_source

_SRC = flags.DEFINE_string("src", "", "Folder of images (local or gs://).")
_OUT = flags.DEFINE_string("out", "", "Output folder for the shards and metadata.json.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the stored images.")
_NUM_CHANNELS = flags.DEFINE_integer("num_channels", 3, "1 (grey) or 3 (RGB).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Images per ArrayRecord shard.")
_SKIP_CORRUPT = flags.DEFINE_bool("skip_corrupt", False, "Skip unreadable files (with a count).")
_EXPORT_DIGITS = flags.DEFINE_string(
    "export_digits", "", "Instead of packing, write sklearn's digits (train split) as "
    "DIR/<digit>/<index>.png, a small folder to try the folder source on.")


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
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  images, labels = input_pipeline.load_digits_arrays("train")
  for index, (image, label) in enumerate(zip(images, labels)):
    path = epath.Path(out) / str(label) / f"{index:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      Image.fromarray(image[..., 0]).save(f, format="PNG")
  return len(images)


def main(argv):
  del argv
  if _EXPORT_DIGITS.value:
    count = export_digits(_EXPORT_DIGITS.value)
    print(f"Wrote {count} digit PNGs in 10 class folders under {_EXPORT_DIGITS.value}.")
    return
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("Pass --src=DIR and --out=DIR (or --export_digits=DIR).")
  metadata = pack(_SRC.value, _OUT.value, _IMAGE_SIZE.value, _NUM_CHANNELS.value,
                  _SHARD_SIZE.value, _SKIP_CORRUPT.value)
  print(f"Packed {metadata['num_examples']} images ({len(metadata['classes'])} classes) at "
        f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}x{_NUM_CHANNELS.value} into "
        f"{len(metadata['shards'])} shard(s) under {_OUT.value}.")


if __name__ == "__main__":
  app.run(main)
