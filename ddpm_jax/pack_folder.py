"""Entry point of the one-time image-folder packer; `ddpm_jax.data.pack_folder` does the work.

  python -m ddpm_jax.pack_folder --src=DIR --out=PACKED --image_size=32 --num_channels=3
  python -m ddpm_jax.pack_folder --export_digits=DIR   # sklearn digits as class-folder PNGs

From Python, call `ddpm_jax.data.pack_folder.pack(src, out, image_size, num_channels)`.
"""

import functools
import types

from absl import app
from absl import flags

from ddpm_jax.data import pack_folder
from ddpm_jax.runtime import process_env


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> types.SimpleNamespace:
  """Defines this program's flags on `flag_values` (nothing is defined at import)."""
  f = flag_values
  return types.SimpleNamespace(
      src=flags.DEFINE_string("src", "", "Folder of images (local or gs://).", flag_values=f),
      out=flags.DEFINE_string("out", "", "Output folder for the shards and metadata.json.",
                              flag_values=f),
      image_size=flags.DEFINE_integer("image_size", 32, "Side of the stored images.",
                                      flag_values=f),
      num_channels=flags.DEFINE_integer("num_channels", 3, "1 (grey) or 3 (RGB).",
                                        flag_values=f),
      shard_size=flags.DEFINE_integer("shard_size", 10_000, "Images per ArrayRecord shard.",
                                      flag_values=f),
      skip_corrupt=flags.DEFINE_bool("skip_corrupt", False, "Skip unreadable files (with a "
                                     "count).", flag_values=f),
      export_digits=flags.DEFINE_string(
          "export_digits", "", "Instead of packing, write sklearn's digits (train split) as "
          "DIR/<digit>/<index>.png, a small folder to try the folder source on.",
          flag_values=f),
  )


def main(argv, args: types.SimpleNamespace):
  del argv
  if args.export_digits.value:
    count = pack_folder.export_digits(args.export_digits.value)
    print(f"Wrote {count} digit PNGs in 10 class folders under {args.export_digits.value}.")
    return
  if not args.src.value or not args.out.value:
    raise app.UsageError("Pass --src=DIR and --out=DIR (or --export_digits=DIR).")
  metadata = pack_folder.pack(args.src.value, args.out.value, args.image_size.value,
                              args.num_channels.value, args.shard_size.value,
                              args.skip_corrupt.value)
  print(f"Packed {metadata['num_examples']} images ({len(metadata['classes'])} classes) at "
        f"{args.image_size.value}x{args.image_size.value}x{args.num_channels.value} into "
        f"{len(metadata['shards'])} shard(s) under {args.out.value}.")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(functools.partial(main, args=define_flags()))
