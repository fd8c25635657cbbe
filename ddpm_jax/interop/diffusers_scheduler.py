"""diffusers' scheduler configs, mapped onto ddpm_jax's diffusion process and back.

A scheduler config gives T, the betas, the prediction type, the variance and clipping;
`process_from_scheduler` matches its betas numerically against `core.schedules.SCHEDULES` (to
1e-6 relative, so betas written in float32 still match) rather than trusting names, so e.g.
diffusers' `scaled_linear` over [1e-4, 0.02] is our `quad`. Fields it does not use (sampling
choices such as `timestep_spacing`, `steps_offset`) are ignored: they do not change the model.

DDPM's published process (Ho et al. 2020, hojonathanho/diffusion scripts/run_*.py) is here too:
linear betas 1e-4..0.02 over T = 1000, eps prediction, x0 clipped when sampling; the CIFAR-10
model samples with the "fixedlarge" variance, the 256x256 models (CelebA-HQ, LSUN) with
"fixedsmall". It is the process of a TF1 checkpoint, and of a diffusers folder without a
scheduler config.
"""

from collections.abc import Mapping
import math
from typing import Any

import numpy as np

from ddpm_jax.core import schedules
from ddpm_jax.interop.diffusers_layout import LayoutError
from ddpm_jax.interop.diffusers_layout import problems_text

# Scheduler classes whose config describes a DDPM process (betas, T, prediction, clipping).
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
# diffusers prediction_type <-> our diffusion.model_output.
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers variance_type -> our diffusion.model_var. diffusers' "learned" reads the extra
# channels as a variance (it takes their square root), ours as a log-variance: not the same
# model, so neither direction maps it. "fixed_small_log" samples the same distribution as
# "fixed_small" (it stores the standard deviation).
VARIANCES_IN = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                "fixed_large": "fixed_large", "learned_range": "learned_range"}
VARIANCES_OUT = {"fixed_small": "fixed_small", "fixed_large": "fixed_large",
                 "learned_range": "learned_range"}


DDPM_PUBLISHED = {"diffusion.schedule": "linear", "diffusion.num_timesteps": 1000,
                  "diffusion.model_output": "eps", "diffusion.clip_x0": True,
                  "diffusion.zero_terminal_snr": False, "diffusion.parameterization": "ddpm"}


def ddpm_published_variance(image_size: int) -> str:
  """DDPM's sampling variance: fixed_large for the 32x32 CIFAR-10 model, else fixed_small."""
  return "fixed_large" if image_size <= 32 else "fixed_small"


def ddpm_published(image_size: int) -> dict:
  return {**DDPM_PUBLISHED, "diffusion.model_var": ddpm_published_variance(image_size)}


def diffusers_betas(cfg: Mapping[str, Any]) -> np.ndarray:
  """The float64 betas a diffusers scheduler config defines (its `betas`, in float64)."""
  num = int(cfg.get("num_train_timesteps", 1000))
  trained = cfg.get("trained_betas")
  if trained is not None:
    return np.asarray(trained, np.float64)
  kind = cfg.get("beta_schedule", "linear")
  start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
  if kind == "linear":
    return np.linspace(start, end, num, dtype=np.float64)
  if kind == "scaled_linear":
    return np.linspace(start**0.5, end**0.5, num, dtype=np.float64) ** 2
  if kind == "squaredcos_cap_v2":
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / num) / f(i / num), 0.999) for i in range(num)])
  raise LayoutError(f"beta_schedule={kind!r}: ddpm_jax reads 'linear', 'scaled_linear', "
                    "'squaredcos_cap_v2' and trained_betas")


def process_from_scheduler(cfg: Mapping[str, Any], image_size: int) -> tuple[dict, list[str]]:
  """Our diffusion fields from a diffusers scheduler config, and notes for the user.

  Returns:
    ({"diffusion.schedule", "diffusion.num_timesteps", "diffusion.model_output",
    "diffusion.model_var", "diffusion.clip_x0", "diffusion.zero_terminal_snr"}, notes).
  Raises:
    LayoutError: an unknown scheduler class, betas equal to none of our schedules, or a
      prediction, variance, clipping or thresholding setting ddpm_jax does not have.
  """
  name = cfg.get("_class_name", "DDPMScheduler")
  if name not in SCHEDULERS:
    raise LayoutError(f"scheduler {name!r}: ddpm_jax reads the DDPM process from "
                      f"{', '.join(SCHEDULERS)} configs. Replace scheduler_config.json with a "
                      "DDPMScheduler config of the same betas, or delete it to use DDPM's "
                      "published process (linear, T=1000, eps).")
  problems, notes = [], []
  num = int(cfg.get("num_train_timesteps", 1000))
  try:
    betas = diffusers_betas(cfg)
  except LayoutError as e:
    problems.append(str(e))
    betas = None
  schedule = None
  if betas is not None:
    for key, fn in schedules.SCHEDULES.items():
      ours = fn(num)
      if ours.shape == betas.shape and np.allclose(ours, betas, rtol=1e-6, atol=0):
        schedule = key
        break
    if schedule is None:
      problems.append(
          f"betas of beta_schedule={cfg.get('beta_schedule')!r} over [{cfg.get('beta_start')}, "
          f"{cfg.get('beta_end')}] (T={num}) equal none of ddpm_jax's schedules "
          f"{sorted(schedules.SCHEDULES)}")
  prediction = cfg.get("prediction_type", "epsilon")
  if prediction not in PREDICTIONS:
    problems.append(f"prediction_type={prediction!r}: ddpm_jax has {sorted(PREDICTIONS)}")
  if name == "DDPMScheduler":
    variance = cfg.get("variance_type", "fixed_small")
  else:
    # DDIM/PNDM configs carry no variance: DDPM's published setting.
    variance = ddpm_published_variance(image_size)
    notes.append(f"{name} has no variance_type; using DDPM's published setting {variance!r} "
                 "(override with --config.diffusion.model_var)")
  if variance not in VARIANCES_IN:
    why = (" (diffusers reads those channels as a variance, ddpm_jax as a log-variance)"
           if variance == "learned" else "")
    problems.append(f"variance_type={variance!r}{why}: ddpm_jax reads {sorted(VARIANCES_IN)}")
  if cfg.get("thresholding", False):
    problems.append("thresholding=True (dynamic thresholding): ddpm_jax clips x0 to [-1, 1] only")
  clip = bool(cfg.get("clip_sample", True))
  if clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
    problems.append(f"clip_sample_range={cfg.get('clip_sample_range')}: ddpm_jax clips to [-1, 1]")
  if problems:
    raise LayoutError(problems_text(f"The {name} config has no ddpm_jax equivalent", problems))
  spacing = cfg.get("timestep_spacing")
  if spacing:
    notes.append(f"timestep_spacing={spacing!r} is a sampling choice; ddpm_jax's samplers take "
                 "sampling.grid (its 'trailing' grid is diffusers' 'trailing')")
  return {
      "diffusion.schedule": schedule,
      "diffusion.num_timesteps": num,
      "diffusion.model_output": PREDICTIONS[prediction],
      "diffusion.model_var": VARIANCES_IN[variance],
      "diffusion.clip_x0": clip,
      "diffusion.zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False)),
      "diffusion.parameterization": "ddpm",  # a DDPMScheduler's model, whatever the base config
  }, notes


# Our schedules diffusers names (others are written as trained_betas).
_NAMED_SCHEDULES = {"linear": ("linear", 1e-4, 0.02), "quad": ("scaled_linear", 1e-4, 0.02),
                    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}


def scheduler_config(diffusion: Mapping[str, Any]) -> dict:
  """A `DDPMScheduler` config of our process (the inverse of `process_from_scheduler`).

  Args:
    diffusion: {"schedule", "num_timesteps", "model_output", "model_var", "clip_x0",
      "zero_terminal_snr"} (our config.diffusion).
  Raises:
    LayoutError: naming each field DDPMScheduler cannot express.
  """
  problems = []
  var = diffusion["model_var"]
  if var not in VARIANCES_OUT:
    problems.append(f"diffusion.model_var={var!r}: diffusers' 'learned' reads the extra channels "
                    "as a variance, ddpm_jax's as a log-variance; DDPMScheduler has "
                    f"{sorted(VARIANCES_OUT)} of ours")
  out = {v: k for k, v in PREDICTIONS.items()}.get(diffusion["model_output"])
  if out is None:
    problems.append(f"diffusion.model_output={diffusion['model_output']!r}: diffusers has "
                    f"{sorted(PREDICTIONS.values())}")
  if problems:
    raise LayoutError(problems_text("diffusers cannot express this model's process", problems))
  num = int(diffusion["num_timesteps"])
  cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": num,
         "variance_type": VARIANCES_OUT[var], "prediction_type": out,
         "clip_sample": bool(diffusion["clip_x0"]), "clip_sample_range": 1.0,
         "thresholding": False, "timestep_spacing": "trailing", "steps_offset": 0,
         "rescale_betas_zero_snr": bool(diffusion["zero_terminal_snr"])}
  named = _NAMED_SCHEDULES.get(diffusion["schedule"])
  if named:
    cfg.update(beta_schedule=named[0], beta_start=named[1], beta_end=named[2],
               trained_betas=None)
  else:
    betas = schedules.SCHEDULES[diffusion["schedule"]](num)
    cfg.update(beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]),
               trained_betas=[float(b) for b in betas])
  return cfg
