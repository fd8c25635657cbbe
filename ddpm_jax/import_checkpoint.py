"""Entry point: published DDPM weights into a ddpm_jax workdir (`interop.importer` does the work).

  # a diffusers UNet2DModel folder (safetensors; a .bin needs torch), or a Hub repository
  python -m ddpm_jax.import_checkpoint --src=path/to/ddpm-cifar10-32 --workdir=runs/ddpm_cifar10 \\
      --config=configs/cifar10.py
  python -m ddpm_jax.import_checkpoint --src=google/ddpm-ema-church-256 \\
      --workdir=runs/ddpm_church --config=configs/lsun_church256.py      # downloads
  # an original TF1 checkpoint of Ho et al. (EMA weights by default; --noema for the raw ones)
  python -m ddpm_jax.import_checkpoint --src=diffusion_cifar10_model/model.ckpt-790000 \\
      --workdir=runs/ddpm_cifar10_tf --config=configs/cifar10.py

`--config` (default configs/base.py) supplies everything the weights do not fix (dataset,
sampling, evaluation; the image size of a TF1 checkpoint); the architecture and the diffusion
process come from the model, and the fields where they differ from the config are listed.
From Python, call `interop.importer.import_checkpoint(src, workdir, config)`, the function
behind it.

Then: python -m ddpm_jax.main --config=configs/workdir.py:WORKDIR --workdir=WORKDIR --mode=sample
"""

import functools
import types

from absl import app
from absl import flags
from ml_collections import config_flags

from ddpm_jax.runtime import process_env


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None) -> types.SimpleNamespace:
  """Defines this program's flags on `flag_values` (nothing is defined at import).

  `sys_argv`: where config_flags reads `--config.KEY=VALUE` overrides (default: sys.argv).
  """
  f = flag_values
  args = types.SimpleNamespace(
      src=flags.DEFINE_string("src", None, "diffusers UNet2DModel folder, Hub repository id "
                              "(org/name or hf://org/name: downloaded), or TF1 checkpoint "
                              "prefix or folder.", flag_values=f),
      workdir=flags.DEFINE_string("workdir", None, "New workdir to write.", flag_values=f),
      config=config_flags.DEFINE_config_file(
          "config", None, "Config for everything the weights do not fix (default "
          "configs/base.py).", flag_values=f, lock_config=False, sys_argv=sys_argv),
      ema=flags.DEFINE_bool("ema", True, "TF1 checkpoints: import the EMA shadow variables "
                            "(--noema: the raw ones). diffusers folders hold one set.",
                            flag_values=f),
      hub_cache=flags.DEFINE_string("hub_cache", None, "huggingface_hub cache folder.",
                                    flag_values=f),
  )
  flags.mark_flags_as_required(["src", "workdir"], flag_values=f)
  return args


def main(argv, args: types.SimpleNamespace):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from configs import base  # pylint: disable=g-import-not-at-top
  from ddpm_jax.interop import importer  # pylint: disable=g-import-not-at-top
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  src, workdir = args.src.value, args.workdir.value
  config = args.config.value if args.config.value is not None else base.get_config()
  record = importer.import_checkpoint(src, workdir, config, ema=args.ema.value,
                                      hub_cache=args.hub_cache.value)
  print(f"Imported {record['params']:,} parameters ({record['kind']}, {record['weights']} "
        f"weights, step {record['step']}) from {src} into {workdir}.")
  if record["changed_from_base_config"]:
    print("Fields taken from the model where the config differed:")
    for key, (old, new) in record["changed_from_base_config"].items():
      print(f"  {key}: {old!r} -> {new!r}")
  for note in record["notes"]:
    print(f"Note: {note}")
  print(f"Sample: python -m ddpm_jax.main --config=configs/workdir.py:{workdir} "
        f"--workdir={workdir} --mode=sample")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(functools.partial(main, args=define_flags()))
