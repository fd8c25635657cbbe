"""`--mode=sample|eval|edit|restore|cascade`: the drivers that load a checkpoint and run.

Each validates the config once (`validation.validate`), restores only the params, and draws
through the sampling service (`generation`); the metrics report is `quality`.

Edit inputs: an .npz (array 'images', else 'samples', else its only array; uint8 in [0, 255] or
float in [-1, 1], [N, H, W, C] or [N, H, W]) or a folder of PNGs (sorted by name). `edit` writes
`<workdir>/edits/<task>_<sampler>_step<k>.npz` (input, mask, output; uint8) and a PNG grid whose
rows are input | mask (known pixels shown, unknown grey) | output:

  python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond --mode=edit \\
      --config.edit.task=inpaint --config.edit.input=inputs.npz --config.edit.mask=left_half
"""

import json
import os
from typing import NamedTuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.config import factories
from ddpm_jax.config import validation
from ddpm_jax.core import degradations
from ddpm_jax.evaluation import autoguidance
from ddpm_jax.evaluation import classifier_guidance
from ddpm_jax.evaluation import generation
from ddpm_jax.evaluation import images
from ddpm_jax.evaluation import quality
from ddpm_jax.metrics import restoration as restoration_metrics
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import run_config
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.sampling import editing
from ddpm_jax.sampling import restoration


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
  parts = validation.validate(config, mode="sample")
  s, d = config.sampling, config.data
  num_samples, low_res = s.num_samples, None
  if config.model.sr_factor > 0:  # read and checked before anything compiles
    h = d.image_size // config.model.sr_factor
    low_res = load_inputs(s.low_res_input, h, d.num_channels, s.num_samples,
                          field="sampling.low_res_input")
    num_samples = len(low_res)
  run = load(config, workdir, parts)
  traj_sampler = factories.sampler_from_config(config, run.parts.tables,
                                               trajectory_every=s.trajectory_every)
  traj_fn = generation.make_sample_fn(config, run.parts.model, run.parts.tables, run.mesh,
                                      traj_sampler, classifier=run.classifier, guide=_guide(run))
  samples, index, traj = generation.draw_local_samples(
      config, sample_fn(config, run), run.params, num_samples, first_batch_fn=traj_fn,
      low_res=low_res)
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
  # A super-resolution stage is scored on its upsampling of held-out low-resolution images.
  fn = sample_fn(config, run, low_res_bank=generation.low_res_bank(config))
  return quality.quality_report(config, workdir, run.params, run.mesh, run.parts.model,
                                run.parts.tables, run.step, sample_fn=fn)


def load_inputs(path: str, size: int, channels: int, limit: int, field: str = "edit.input",
                height: int | None = None) -> np.ndarray:
  """Input images as float32 [N, H, W, C] in [-1, 1]; fails naming the expected shape.

  `field` names the config field in errors; `height` (default `size`) for non-square inputs.
  """
  height = size if height is None else height
  if not path:
    mode = field.split(".")[0]
    raise ValueError(f"--mode={mode} needs --config.{field}: an .npz of images or a PNG folder.")
  if os.path.isdir(path):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
    if not names:
      raise ValueError(f"{field}={path} holds no .png files.")
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
    raise ValueError(f"{field}={path} is neither an .npz file nor a folder of PNGs.")
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[1:] != (height, size, channels):
    raise ValueError(f"{field} images are {x.shape[1:]} but {height, size, channels} are needed "
                     "(data.image_size, data.num_channels, and the task's measurement shape).")
  # Integers are [0, 255] pixels; floats are taken as [-1, 1] (a noisy measurement may exceed it).
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.float32) / 127.5 - 1.0
  return x.astype(np.float32)


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


def restore_operator(config: ml_collections.ConfigDict) -> degradations.Operator:
  """The degradation of `restore.task` (and `restore.mask`) for the model's images."""
  d, r = config.data, config.restore
  mask = editing.make_mask(r.mask, d.image_size, d.image_size) if r.task == "inpaint" else None
  return degradations.make(r.task, d.image_size, d.num_channels, mask)


def measure(config: ml_collections.ConfigDict, op: degradations.Operator, truth) -> np.ndarray:
  """y = A x + sigma_y n of `--mode=restore`, the noise drawn from sampling.seed at y's shape."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.sampling.seed), 0x5E5)
  return np.asarray(restoration.measure(op, jnp.asarray(truth), float(config.restore.sigma_y),
                                        key))


def shown_measurement(op: degradations.Operator, y: np.ndarray, shape) -> np.ndarray:
  """The measurement as an image of the model's shape: y itself where it has that shape (blur,
  inpainting, denoising), its channel broadcast (colourise), else A^+ y (super-resolution:
  nearest-neighbour upsampling)."""
  if y.shape == shape:
    return y
  if y.shape[:-1] == shape[:-1]:
    return np.broadcast_to(y, shape)
  return np.asarray(op.pinv(y))


def restore(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=restore`: the zero-shot solver of `restore.method` on the newest checkpoint.

  The input is the truth (measured here: y = A x + sigma_y n, with the noise drawn from
  sampling.seed) or the measurement itself; both are read and checked before anything compiles.
  Writes `<workdir>/restorations/<task>_<method>_sy<sigma_y>_<sampler>_step<k>`: `.npz`
  (truth when given, measurement y as float32, output as uint8, and the solver's unclipped
  output_float), `.png` (rows of
  truth | measurement | restoration, or measurement | restoration) and `.json` (the metrics: PSNR
  and SSIM against the truth, and the consistency ||A x^ - y|| / ||y||, per image and mean).
  Returns the metrics, and under "npz" the path of the `.npz`.
  """
  parts = validation.validate(config, mode="restore")
  d, r = config.data, config.restore
  size, channels = d.image_size, d.num_channels
  op = restore_operator(config)
  if r.input_kind == "truth":
    truth = load_inputs(r.input, size, channels, r.num_images, field="restore.input")
    y = measure(config, op, truth)
  else:
    y_shape = op.y_shape((1, size, size, channels))[1:]
    truth = None
    y = load_inputs(r.input, y_shape[1], y_shape[2], r.num_images, field="restore.input",
                    height=y_shape[0])
  run = load(config, workdir, parts)
  tables, sampler, dv = run.parts.tables, run.parts.sample_fn, config.diffusion
  n = y.shape[0]
  # The service pads the batch to a multiple of the device count; the measurements alike.
  padded = -(-n // jax.device_count()) * jax.device_count()
  y_padded = np.concatenate([y, np.repeat(y[-1:], padded - n, axis=0)])

  def restore_fn(model_fn, rng, shape):
    return restoration.restore(sampler, model_fn, tables, rng, op, y_padded, shape,
                               method=r.method, sigma_y=float(r.sigma_y),
                               model_output=factories.model_output(config),
                               model_var=dv.model_var, clip_x0=dv.clip_x0,
                               sigma_data=float(r.sigma_data))

  fn = generation.make_sample_fn(config, run.parts.model, tables, run.mesh, restore_fn,
                                 classifier=run.classifier, guide=_guide(run))
  raw, _ = fn(run.params, jax.random.PRNGKey(config.sampling.seed), n)
  out = np.clip(raw, -1.0, 1.0)  # the images; the solver's own output is kept as output_float
  metrics = restoration_metrics.per_image(out, truth, ax_hat=np.asarray(op.A(out)), y=y)
  report = restoration_metrics.mean(metrics)
  report.update({f"{k}_per_image": [float(u) for u in v] for k, v in metrics.items()})
  name = (f"{r.task}_{r.method}_sy{float(r.sigma_y):g}_{factories.sampler_label(config)}"
          f"_step{run.step}")
  stem = epath.Path(workdir) / "restorations" / name
  out_u8 = images.to_uint8(out)
  shown = images.to_uint8(np.clip(shown_measurement(op, y, out.shape), -1.0, 1.0))
  if jax.process_index() == 0:
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(measurement=y.astype(np.float32), output=out_u8,
                  output_float=np.asarray(raw, np.float32))
    if truth is not None:
      arrays["truth"] = images.to_uint8(truth)
    with (stem.parent / f"{name}.npz").open("wb") as f:  # not with_suffix: "sy0.05" has a dot
      np.savez_compressed(f, **arrays)
    cols = ([arrays["truth"]] if truth is not None else []) + [shown, out_u8]
    rows = np.stack(cols, axis=1).reshape((-1,) + out_u8.shape[1:])
    images.save_png(stem.parent / f"{name}.png", images.make_grid(rows, ncol=len(cols)),
                    scale=max(1, 128 // size))
    (stem.parent / f"{name}.json").write_text(json.dumps(report, indent=1))
  summary = ", ".join(f"{k} {report[k]:.4g}" for k in ("psnr", "ssim", "consistency")
                      if k in report)
  logging.info("Restored %d images (%s, %s, sigma_y=%g): %s. Wrote %s.npz/.png/.json.", n,
               r.task, r.method, float(r.sigma_y), summary, stem)
  return {**report, "npz": str(stem.parent / f"{name}.npz")}


def cascade(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`--mode=cascade`: samples the base run of `cascade.base_workdir` (with its own config.json,
  and this config's sampling.num_samples, batch_size and seed), then this super-resolution stage
  on those samples (cascaded diffusion, Ho et al. 2022). Both configs are checked, and the base's
  image shape against this stage's input, before anything compiles.

  Writes `<workdir>/cascade/<sampler>_<steps>_step<k>.npz` (base: the base samples, samples: the
  upsampled ones, uint8) and a PNG grid of base (nearest-neighbour) | super-resolved pairs.
  """
  parts = validation.validate(config, mode="cascade")
  base_dir = str(config.cascade.base_workdir)
  base_config = run_config.load(base_dir)
  if base_config is None:
    raise ValueError(f"cascade.base_workdir={base_dir}: no config.json there (not a ddpm_jax run).")
  d, bd, f = config.data, base_config.data, int(config.model.sr_factor)
  if (bd.image_size * f, bd.num_channels) != (d.image_size, d.num_channels):
    raise ValueError(f"The base run makes {bd.image_size}x{bd.image_size}x{bd.num_channels} "
                     f"images; this stage (x{f}) takes {d.image_size // f}x{d.image_size // f}x"
                     f"{d.num_channels}.")
  with base_config.unlocked():
    for key in ("num_samples", "batch_size", "seed"):
      base_config.sampling[key] = config.sampling[key]
  base_parts = validation.validate(base_config, mode="sample", open_data=False)
  base_run = load(base_config, base_dir, base_parts)
  run = load(config, workdir, parts)
  n = config.sampling.num_samples
  base, _ = generation.draw_samples(base_config, sample_fn(base_config, base_run),
                                    base_run.params, n)
  low_res = base.astype(np.float32) / 127.5 - 1.0
  samples, _ = generation.draw_samples(config, sample_fn(config, run), run.params, n,
                                       low_res=low_res)
  stem = epath.Path(workdir) / "cascade" / f"{factories.sampler_label(config)}_step{run.step}"
  if jax.process_index() == 0:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with (stem.parent / f"{stem.name}.npz").open("wb") as fh:
      np.savez_compressed(fh, base=base, samples=samples)
    up = np.repeat(np.repeat(base[:50], f, axis=1), f, axis=2)
    rows = np.stack([up, samples[:50]], axis=1).reshape((-1,) + samples.shape[1:])
    images.save_png(stem.parent / f"{stem.name}.png", images.make_grid(rows, ncol=10),
                    scale=max(1, 128 // d.image_size))
  logging.info("Cascade: %d base samples (%s, step %d) upsampled x%d by step %d. Wrote %s.npz.",
               n, base_dir, base_run.step, f, run.step, stem)
  return str(stem.parent / f"{stem.name}.npz")
