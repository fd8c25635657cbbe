"""Entry point: a ddpm_jax workdir out as a diffusers folder (`interop.exporter` does the work).

  python -m ddpm_jax.export_checkpoint --workdir=runs/digits --out=exported/digits

writes out/{config.json, diffusion_pytorch_model.safetensors, scheduler_config.json} from the
newest checkpoint's EMA params (--noema: the raw ones). In PyTorch:

  from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
  pipe = DDPMPipeline(UNet2DModel.from_pretrained(out), DDPMScheduler.from_pretrained(out))
  images = pipe(batch_size=4, num_inference_steps=1000).images

From Python, call `interop.exporter.export_checkpoint(workdir, out)`, the function behind it.
"""

import functools
import types

from absl import app
from absl import flags

from ddpm_jax.runtime import process_env


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> types.SimpleNamespace:
  """Defines this program's flags on `flag_values` (nothing is defined at import)."""
  f = flag_values
  args = types.SimpleNamespace(
      workdir=flags.DEFINE_string("workdir", None, "A ddpm_jax workdir (trained or imported).",
                                  flag_values=f),
      out=flags.DEFINE_string("out", None, "New folder for the diffusers model.", flag_values=f),
      ema=flags.DEFINE_bool("ema", True, "Export the EMA params (--noema: the raw ones).",
                            flag_values=f),
      step=flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).",
                                flag_values=f),
  )
  flags.mark_flags_as_required(["workdir", "out"], flag_values=f)
  return args


def main(argv, args: types.SimpleNamespace):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from ddpm_jax.interop import exporter  # pylint: disable=g-import-not-at-top
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  summary = exporter.export_checkpoint(args.workdir.value, args.out.value, use_ema=args.ema.value,
                                       step=args.step.value)
  print(f"Wrote {summary['params']:,} {summary['weights']} parameters of step {summary['step']} "
        f"to {summary['out']} (diffusers UNet2DModel + DDPMScheduler).")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(functools.partial(main, args=define_flags()))
