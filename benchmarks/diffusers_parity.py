"""How exactly an imported diffusers model reproduces diffusers: outputs and DDIM paths.

  pip install -e '.[test]'      # torch (CPU) and diffusers
  python benchmarks/diffusers_parity.py [--cifar10]

Builds diffusers' `UNet2DModel` in DDPM's layout at the digits size (and, with --cifar10, in the
35.7M-parameter CIFAR-10 layout of google/ddpm-cifar10-32) with every parameter random, saves it
as a diffusers folder, imports it with `ddpm_jax.interop.importer` and prints
  * the relative error max|ours - theirs| / max|theirs| of one forward pass at t = 0, 417, 999;
  * for each of our schedules (given to diffusers as the exported scheduler config), the largest
    absolute difference after 10 DDIM steps from the same x_T: ours on the 'trailing' grid
    against `DDIMScheduler` with timestep_spacing='trailing', x0 clipped (diffusers'
    use_clipped_model_output=True, which is what our DDIM does).
End to end, each side runs its own network and diffusers its own scheduler built from our
exported config (its abar a float32 cumulative product: 1.7e-5 relative from ours at t = 999 on
the linear schedule). The two forward passes' float32 differences (about 1e-6 relative) are then
amplified by 1 / sqrt(abar_T) in an eps model's first x0 estimate: large where abar_T is near 0
(cosine, sigmoid). The "same network" column drives diffusers' scheduler with our network's
outputs and our abar (rounded once to float32): the update rules alone.
Asserts nothing: tests/interop_test.py holds the bounds (1e-5 and 1e-4).
"""

import os
import sys
import tempfile

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from configs import cifar10
from configs import digits
from configs import workdir as workdir_config
from ddpm_jax.config import factories
from ddpm_jax.core import schedules
from ddpm_jax.interop import importer
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import process_env
from ddpm_jax.runtime import train_state as train_state_lib
from tests import diffusers_reference

_CIFAR10 = flags.DEFINE_bool("cifar10", False, "Also the CIFAR-10 layout (35.7M params).")


def forward_error(get_config, tmp: str, name: str) -> tuple[int, float]:
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  config = get_config()
  unet = diffusers_reference.randomise(diffusers_reference.diffusers_unet(config), seed=1)
  src, workdir = os.path.join(tmp, f"{name}_src"), os.path.join(tmp, f"{name}_W")
  unet.save_pretrained(src)
  diffusers.DDPMScheduler(variance_type="fixed_large").save_pretrained(src)
  importer.import_checkpoint(src, workdir, get_config())
  config = workdir_config.get_config(workdir)
  model = factories.create_model(config)
  abstract = train_state_lib.abstract_params(config, model, mesh_lib.make_mesh())
  params, _ = checkpointing.restore_params(workdir, abstract)
  d = config.data
  x = np.random.default_rng(0).standard_normal(
      (3, d.image_size, d.image_size, d.num_channels)).astype(np.float32)
  t = np.array([0, 417, 999])
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), train=False))
  with torch.no_grad():
    theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                  torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
  return sum(p.numel() for p in unet.parameters()), float(
      np.abs(ours - theirs).max() / np.abs(theirs).max())


def main(_):
  with tempfile.TemporaryDirectory() as tmp:
    rows = [("digits", digits.get_config)] + ([("cifar10", cifar10.get_config)]
                                              if _CIFAR10.value else [])
    print("| layout | params | forward rel. error |\n|---|---:|---:|")
    for name, get_config in rows:
      count, err = forward_error(get_config, tmp, name)
      print(f"| {name} | {count:,} | {err:.1e} |")
  print("\n| schedule | prediction | abar_T | DDIM-10 max abs diff, each its own network | "
        "same network (scheduler arithmetic) |\n|---|---|---:|---:|---:|")
  for schedule, output in diffusers_reference.DDIM_CASES:
    abar_t = float(np.prod(1 - schedules.SCHEDULES[schedule](1000)))
    print(f"| {schedule} | {output} | {abar_t:.1e} | "
          f"{diffusers_reference.ddim_difference(schedule, output, False):.1e} | "
          f"{diffusers_reference.ddim_difference(schedule, output, True):.1e} |")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(main)
