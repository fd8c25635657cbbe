"""Entry point of the one-time image-folder packer; `ddpm_jax.data.pack_folder` does the work.

  python -m ddpm_jax.pack_folder --src=DIR --out=PACKED --image_size=32 --num_channels=3
  python -m ddpm_jax.pack_folder --export_digits=DIR   # sklearn digits as class-folder PNGs
"""

from absl import app
from absl import flags

from ddpm_jax.data import pack_folder
from ddpm_jax.runtime import process_env

_SRC = flags.DEFINE_string("src", "", "Folder of images (local or gs://).")
_OUT = flags.DEFINE_string("out", "", "Output folder for the shards and metadata.json.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the stored images.")
_NUM_CHANNELS = flags.DEFINE_integer("num_channels", 3, "1 (grey) or 3 (RGB).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Images per ArrayRecord shard.")
_SKIP_CORRUPT = flags.DEFINE_bool("skip_corrupt", False, "Skip unreadable files (with a count).")
_EXPORT_DIGITS = flags.DEFINE_string(
    "export_digits", "", "Instead of packing, write sklearn's digits (train split) as "
    "DIR/<digit>/<index>.png, a small folder to try the folder source on.")



def main(argv):
  del argv
  if _EXPORT_DIGITS.value:
    count = pack_folder.export_digits(_EXPORT_DIGITS.value)
    print(f"Wrote {count} digit PNGs in 10 class folders under {_EXPORT_DIGITS.value}.")
    return
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("Pass --src=DIR and --out=DIR (or --export_digits=DIR).")
  metadata = pack_folder.pack(_SRC.value, _OUT.value, _IMAGE_SIZE.value, _NUM_CHANNELS.value,
                  _SHARD_SIZE.value, _SKIP_CORRUPT.value)
  print(f"Packed {metadata['num_examples']} images ({len(metadata['classes'])} classes) at "
        f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}x{_NUM_CHANNELS.value} into "
        f"{len(metadata['shards'])} shard(s) under {_OUT.value}.")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(main)
