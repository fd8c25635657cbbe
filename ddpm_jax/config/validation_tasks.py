"""The rules of the image tasks on a config, checked by `validation.validate` before any compile:
--mode=edit (inpainting, SDEdit), --mode=restore (zero-shot inverse problems) and a
super-resolution stage (`model.sr_factor`, --mode=cascade).
"""

import ml_collections

from ddpm_jax.config import conditioning
from ddpm_jax.core import degradations
from ddpm_jax.core import diffusion
from ddpm_jax.sampling import editing
from ddpm_jax.sampling import restoration

EDIT_TASKS = ("inpaint", "sdedit")
RESTORE_INPUT_KINDS = ("truth", "measurement")


def check_edit(config: ml_collections.ConfigDict) -> None:
  """--mode=edit: the task, its timestep and class, and RePaint's counts."""
  e, t_last = config.edit, config.diffusion.num_timesteps - 1
  if e.task not in EDIT_TASKS:
    raise ValueError(f"Unknown edit.task {e.task!r}; valid choices: {list(EDIT_TASKS)}.")
  if e.task == "sdedit" and not 0 <= e.t0 <= t_last:
    raise ValueError(f"edit.t0={e.t0} is out of range: SDEdit noises to a timestep index in "
                     f"[0, {t_last}] (diffusion.num_timesteps - 1).")
  conditioning.check_class_label(config, int(e.class_label), "edit.class_label")
  if e.resample_jump < 0 or e.resample_count < 0:
    raise ValueError("edit.resample_jump and edit.resample_count must be >= 0.")
  if e.num_images <= 0:
    raise ValueError(f"edit.num_images must be positive, got {e.num_images}.")


def check_super_resolution(config: ml_collections.ConfigDict, mode: str) -> None:
  """A super-resolution stage (model.sr_factor > 0): its factor against the image size, its
  augmentation levels, what it cannot be combined with, and its input in each mode."""
  f, d, s = int(config.model.get("sr_factor", 0)), config.data, config.sampling
  if f < 0:
    raise ValueError(f"model.sr_factor must be >= 0 (0 = not a super-resolution stage), got {f}.")
  if f == 0:
    if mode == "cascade":
      raise ValueError("--mode=cascade runs a super-resolution stage (model.sr_factor > 0), e.g. "
                       "--config=configs/digits_sr.py.")
    return
  if f == 1 or d.image_size % f:
    raise ValueError(f"model.sr_factor={f}: use a factor >= 2 that divides data.image_size="
                     f"{d.image_size}.")
  for name, value in (("training.cond_aug_max", config.training.cond_aug_max),
                      ("sampling.cond_aug", s.cond_aug)):
    if not float(value) >= 0:
      raise ValueError(f"{name} (a noise std) must be >= 0, got {value}.")
  if config.training.objective != "diffusion":
    raise ValueError("model.sr_factor applies to denoisers (training.objective=diffusion).")
  for name, on in (("model.num_classes", config.model.num_classes > 0),
                   ("sampling.classifier_workdir", bool(s.classifier_workdir)),
                   ("sampling.guide_workdir", bool(s.guide_workdir))):
    if on:
      raise ValueError(f"A super-resolution stage (model.sr_factor={f}) does not take {name}; "
                       "unset it.")
  if mode == "eval" and "bpd" in config.eval.metrics or \
     mode == "train" and "bpd" in config.training.final_eval_metrics:
    raise ValueError("bits/dim of a super-resolution stage is not implemented (it would be "
                     "conditional on the low-resolution input); drop 'bpd' from the metrics.")
  if mode in ("edit", "restore"):
    raise ValueError(f"--mode={mode} takes an unconditional or class-conditional model; this is "
                     f"a super-resolution stage (model.sr_factor={f}): sample it with "
                     "--config.sampling.low_res_input, or --mode=cascade.")
  if mode == "sample" and not s.low_res_input:
    h = d.image_size // f
    raise ValueError(f"This super-resolution stage (model.sr_factor={f}) needs its low-resolution "
                     f"input: --config.sampling.low_res_input=<.npz or PNG folder of {h}x{h} "
                     "images>, or --mode=cascade with --config.cascade.base_workdir.")
  if mode == "cascade" and not config.cascade.base_workdir:
    raise ValueError("--mode=cascade needs --config.cascade.base_workdir: the run whose samples "
                     "this stage upsamples.")


def check_restore(config: ml_collections.ConfigDict) -> None:
  """--mode=restore: the task against the model's image shape, the method, sigma_y, the mask."""
  r, d = config.restore, config.data
  if config.training.objective != "diffusion":
    raise ValueError("--mode=restore needs a diffusion model (training.objective=diffusion).")
  try:
    degradations.check(r.task, d.image_size, d.num_channels)
    restoration.check(r.method, float(r.sigma_y))
  except ValueError as error:
    raise ValueError(f"restore: {error}") from None
  diffusion.check_choice("restore.input_kind", r.input_kind, RESTORE_INPUT_KINDS)
  if r.task == "inpaint":
    editing.make_mask(r.mask, d.image_size, d.image_size)
  if not float(r.sigma_data) > 0:
    raise ValueError(f"restore.sigma_data must be positive, got {r.sigma_data}.")
  if r.num_images <= 0:
    raise ValueError(f"restore.num_images must be positive, got {r.num_images}.")
