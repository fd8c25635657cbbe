"""`--mode=edit`: inpainting or SDEdit of given images with a trained checkpoint.

  python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond --mode=edit \\
      --config.edit.task=inpaint --config.edit.input=inputs.npz --config.edit.mask=left_half

Inputs: an .npz (array 'images', else 'samples', else its only array; uint8 in [0, 255] or float
in [-1, 1], [N, H, W, C] or [N, H, W]) or a folder of PNGs (sorted by name). Writes
`<workdir>/edits/<task>_<sampler>_step<k>.npz` (input, mask, output; uint8) and a PNG grid whose
rows are input | mask (known pixels shown, unknown grey) | output. Every check runs before any
compile.
"""

import os

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import conditioning
from ddpm_jax import config_lib
from ddpm_jax import editing
from ddpm_jax import evaluate
from ddpm_jax import generation
from ddpm_jax import images

TASKS = ("inpaint", "sdedit")


def load_inputs(path: str, size: int, channels: int, limit: int) -> np.ndarray:
  """Input images as float32 [N, H, W, C] in [-1, 1]; fails naming the expected shape."""
  if not path:
    raise ValueError("--mode=edit needs --config.edit.input: an .npz of images or a PNG folder.")
  if os.path.isdir(path):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
    if not names:
      raise ValueError(f"edit.input={path} holds no .png files.")
    arrays = []
    for n in names[:limit]:
      with Image.open(os.path.join(path, n)) as img:
        arrays.append(np.asarray(img.convert("L" if channels == 1 else "RGB")))
    x = np.stack(arrays)
  elif path.endswith(".npz"):
    with np.load(path) as f:
      key = next((k for k in ("images", "samples") if k in f), None)
      if key is None and len(f.files) != 1:
        raise ValueError(f"{path} has arrays {f.files}; name the images 'images'.")
      x = f[key or f.files[0]][:limit]
  else:
    raise ValueError(f"edit.input={path} is neither an .npz file nor a folder of PNGs.")
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[1:] != (size, size, channels):
    raise ValueError(f"edit.input images are {x.shape[1:]} but the model takes "
                     f"({size}, {size}, {channels}) (data.image_size, data.num_channels).")
  x = x.astype(np.float32)
  return x / 127.5 - 1.0 if x.max() > 1.0 else x


def check_edit_config(config) -> None:
  e, t_last = config.edit, config.diffusion.num_timesteps - 1
  if e.task not in TASKS:
    raise ValueError(f"Unknown edit.task {e.task!r}; valid choices: {list(TASKS)}.")
  if e.task == "sdedit" and not 0 <= e.t0 <= t_last:
    raise ValueError(f"edit.t0={e.t0} is out of range: SDEdit noises to a timestep index in "
                     f"[0, {t_last}] (diffusion.num_timesteps - 1).")
  conditioning.check_class_label(config, int(e.class_label), "edit.class_label")
  if e.resample_jump < 0 or e.resample_count < 0:
    raise ValueError("edit.resample_jump and edit.resample_count must be >= 0.")
  if e.num_images <= 0:
    raise ValueError(f"edit.num_images must be positive, got {e.num_images}.")


def edit(config, workdir: str) -> str:
  """Runs the configured edit on the newest checkpoint; returns the .npz path."""
  check_edit_config(config)
  d, e = config.data, config.edit
  x0 = load_inputs(e.input, d.image_size, d.num_channels, e.num_images)
  mask = editing.make_mask(e.mask, d.image_size, d.image_size)
  mesh, model, tables = evaluate._setup(config)  # pylint: disable=protected-access
  params, step = evaluate._load_params(config, workdir, mesh, model)  # pylint: disable=protected-access
  label = None if e.class_label < 0 else int(e.class_label)
  sample_fn = config_lib.sampler_from_config(config, tables)
  n = x0.shape[0]
  dv = config.diffusion
  use_repaint = e.task == "inpaint" and e.resample_jump > 0 and e.resample_count > 0

  def run(params, rng, x0):
    def cond_fn(x, t, y):
      return model.apply({"params": params}, x, t, y, train=False)
    model_fn = conditioning.guided_model_fn(config, cond_fn, n, label)
    if e.task == "sdedit":
      return editing.sdedit(sample_fn, model_fn, tables, rng, x0, float(e.t0))[0]
    if use_repaint:
      return editing.repaint(model_fn, tables, rng, x0, mask, jump=e.resample_jump,
                             count=e.resample_count, model_output=dv.model_output,
                             model_var=dv.model_var, clip_x0=dv.clip_x0)
    return editing.inpaint(sample_fn, model_fn, tables, rng, x0, mask)[0]

  rng = jax.random.PRNGKey(config.sampling.seed)
  out = generation.to_host(jax.jit(run)(params, rng, jnp.asarray(x0)))
  name = f"{e.task}{'_repaint' if use_repaint else ''}_{generation.sampler_label(config)}"
  stem = epath.Path(workdir) / "edits" / f"{name}_step{step}"
  inputs_u8, out_u8 = images.to_uint8(x0), images.to_uint8(out)
  shown = np.where(mask > 0, x0, 0.0) if e.task == "inpaint" else x0
  mask_u8 = images.to_uint8(np.broadcast_to(shown, x0.shape))
  if jax.process_index() == 0:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with stem.with_suffix(".npz").open("wb") as f:
      np.savez_compressed(f, input=inputs_u8, mask=(mask[..., 0] > 0).astype(np.uint8),
                          output=out_u8)
    rows = np.stack([inputs_u8, mask_u8, out_u8], axis=1).reshape((-1,) + out_u8.shape[1:])
    images.save_png(stem.with_suffix(".png"), images.make_grid(rows, ncol=3),
                    scale=max(1, 128 // d.image_size))
  logging.info("Wrote %d edited images (%s) to %s.", n, e.task, stem.with_suffix(".npz"))
  return str(stem.with_suffix(".npz"))
