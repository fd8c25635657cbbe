"""`--mode=sample`, `--mode=eval` and `--mode=edit`: the drivers that load a checkpoint and run.

Each validates the config once (`validation.validate`), restores only the params, and draws
through the sampling service (`generation`); the metrics report is `quality`.

Edit inputs: an .npz (array 'images', else 'samples', else its only array; uint8 in [0, 255] or
float in [-1, 1], [N, H, W, C] or [N, H, W]) or a folder of PNGs (sorted by name). `edit` writes
`<workdir>/edits/<task>_<sampler>_step<k>.npz` (input, mask, output; uint8) and a PNG grid whose
rows are input | mask (known pixels shown, unknown grey) | output:

  python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond --mode=edit \\
      --config.edit.task=inpaint --config.edit.input=inputs.npz --config.edit.mask=left_half
"""

import os
from typing import NamedTuple

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.evaluation import autoguidance
from ddpm_jax.evaluation import classifier_guidance
from ddpm_jax.evaluation import generation
from ddpm_jax.evaluation import images
from ddpm_jax.evaluation import quality
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.sampling import editing


class Loaded(NamedTuple):
  """A validated config's objects, the device mesh and a checkpoint's params."""

  parts: factories.Components
  mesh: jax.sharding.Mesh
  params: object
  step: int
  classifier: tuple | None  # (module, params) of classifier guidance
  guide: tuple | None = None  # (module, params) of autoguidance's guide


def load(config: ml_collections.ConfigDict, workdir: str, parts: factories.Components) -> Loaded:
  """Restores the newest checkpoint's (EMA) params for a validated config's model.

  Only the params are read, against `jax.eval_shape` of the model's init: no optimiser or
  importance state is built, so e.g. --config.optim.grad_clip=0 or
  --config.diffusion.t_sampling=importance work on any run; a change of the params' shapes fails
  naming the config fields that differ from the run's config.json.
  """
  mesh = mesh_lib.make_mesh()
  abstract = train_state_lib.abstract_params(config, parts.model, mesh)
  arch = {}
  source = run_config.record_dir(workdir)  # the run's own, or a linked run's (sweeps)
  if source is not None:
    latest = run_config.segment_config(source, 1 << 62) or {}
    arch = run_config.architecture_fields(run_config.differences(latest, run_config.flat(config)))
    meaning = run_config.meaning_differences(latest, run_config.flat(config))
    if meaning:
      run = ", ".join(f"{k}={a!r}" for k, (a, _) in meaning.items())
      now = ", ".join(f"{k}={b!r}" for k, (_, b) in meaning.items())
      raise ValueError(f"{source} trained its network as {run}, but this config says {now}: its "
                       "outputs would be misread. Use the run's values, e.g. "
                       f"--config=configs/workdir.py:{source}.")
  hint = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in arch.items())
  use_ema = config.sampling.use_ema
  params, step = checkpointing.restore_params(workdir, abstract, use_ema=use_ema, hint=hint)
  logging.info("Loaded %s params of step %d from %s.", "EMA" if use_ema else "raw", step, workdir)
  classifier = classifier_guidance.load(parts.classifier, mesh, use_ema)
  guide = autoguidance.load(parts.guide, mesh, use_ema)
  if guide is not None:
    logging.info("Autoguidance w=%g by %s at step %d.", config.sampling.autoguidance_scale,
                 parts.guide.workdir, parts.guide.step)
  return Loaded(parts, mesh, params, step, classifier, guide)


def _guide(run: Loaded):
  """(GuideRun, module, params) of autoguidance, or None."""
  return None if run.guide is None else (run.parts.guide, *run.guide)


def sample_fn(config, run: Loaded, **kwargs):
  """The sampling service for the configured sampler of a loaded run (see `generation`)."""
  return generation.make_sample_fn(config, run.parts.model, run.parts.tables, run.mesh,
                                   run.parts.sample_fn, classifier=run.classifier,
                                   guide=_guide(run), **kwargs)


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `samples/<sampler>_<steps>_step<N>.npz` (uint8), a PNG grid and a trajectory figure.

  On several processes each writes `..._process<k>of<P>.npz` with its own samples and their
  indices (`index`) in the global order: no host holds every sample.
  """
  run = load(config, workdir, validation.validate(config, mode="sample"))
  s = config.sampling
  traj_sampler = factories.sampler_from_config(config, run.parts.tables,
                                               trajectory_every=s.trajectory_every)
  traj_fn = generation.make_sample_fn(config, run.parts.model, run.parts.tables, run.mesh,
                                      traj_sampler, classifier=run.classifier, guide=_guide(run))
  samples, index, traj = generation.draw_local_samples(
      config, sample_fn(config, run), run.params, s.num_samples, first_batch_fn=traj_fn)
  label = factories.sampler_label(config)
  if config.model.num_classes > 0:  # e.g. ddim_50_class3_w1.0 (class -1: all)
    label += f"_class{s.class_label}_w{s.guidance_scale}"
  if s.guide_workdir:  # autoguidance, e.g. ..._ag1.0_guide500
    label += f"_ag{s.autoguidance_scale}_guide{run.parts.guide.step}"
  if s.classifier_workdir:  # classifier guidance, e.g. ..._class3_cg2.0
    label += ("" if config.model.num_classes > 0 else f"_class{s.class_label}") + \
        f"_cg{s.classifier_scale}"
  stem = epath.Path(workdir) / "samples" / f"{label}_step{run.step}"
  # Each process writes the samples its devices drew (key `index`: their places in the global
  # order); one process writes them all, in order, as before.
  k, count = jax.process_index(), jax.process_count()
  suffix = f"_process{k}of{count}" if count > 1 else ""
  path = stem.parent / f"{stem.name}{suffix}.npz"  # not with_suffix: "_w1.0_step4" has a dot
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    np.savez_compressed(f, samples=samples, **({"index": index} if count > 1 else {}))
  if k == 0:  # the grid and the trajectory from process 0's own share
    scale = max(1, 128 // config.data.image_size)
    images.save_png(stem.parent / f"{stem.name}.png", images.make_grid(samples[:100]), scale=scale)
    if traj is not None:
      images.save_trajectory_figure(stem.parent / f"{stem.name}_trajectory.png", traj)
  logging.info("Wrote %d samples to %s.", len(samples), path)
  return str(path)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=eval`: loads the newest checkpoint and runs `quality_report` on it."""
  run = load(config, workdir, validation.validate(config, mode="eval"))
  return quality.quality_report(config, workdir, run.params, run.mesh, run.parts.model,
                                run.parts.tables, run.step, sample_fn=sample_fn(config, run))


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


def edit(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs the configured edit (inpainting, RePaint or SDEdit) on the newest checkpoint; returns
  the .npz path. The inputs are read and checked before anything compiles."""
  parts = validation.validate(config, mode="edit")
  d, e = config.data, config.edit
  x0 = load_inputs(e.input, d.image_size, d.num_channels, e.num_images)
  mask = editing.make_mask(e.mask, d.image_size, d.image_size)
  run = load(config, workdir, parts)
  tables, sampler, dv = run.parts.tables, run.parts.sample_fn, config.diffusion
  n = x0.shape[0]
  # The service pads the batch to a multiple of the device count; the inputs are padded alike.
  padded = -(-n // jax.device_count()) * jax.device_count()
  x0_padded = np.concatenate([x0, np.repeat(x0[-1:], padded - n, axis=0)])
  use_repaint = e.task == "inpaint" and e.resample_jump > 0 and e.resample_count > 0

  def edit_fn(model_fn, rng, shape):
    del shape  # that of x0_padded
    if e.task == "sdedit":
      return editing.sdedit(sampler, model_fn, tables, rng, x0_padded, float(e.t0))[0], None
    if use_repaint:
      return editing.repaint(model_fn, tables, rng, x0_padded, mask, jump=e.resample_jump,
                             count=e.resample_count, model_output=factories.model_output(config),
                             model_var=dv.model_var, clip_x0=dv.clip_x0), None
    return editing.inpaint(sampler, model_fn, tables, rng, x0_padded, mask)[0], None

  label = None if e.class_label < 0 else int(e.class_label)
  fn = generation.make_sample_fn(config, run.parts.model, tables, run.mesh, edit_fn,
                                 classifier=run.classifier, guide=_guide(run), label=label)
  out, _ = fn(run.params, jax.random.PRNGKey(config.sampling.seed), n)
  name = f"{e.task}{'_repaint' if use_repaint else ''}_{factories.sampler_label(config)}"
  stem = epath.Path(workdir) / "edits" / f"{name}_step{run.step}"
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
