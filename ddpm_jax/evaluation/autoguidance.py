"""Autoguidance from a weaker model of the same data (Karras et al. 2024, "Guiding a diffusion
model with a bad version of itself").

`sampling.guide_workdir` names the guide's workdir (a smaller config, or this run at an earlier
`sampling.guide_step`), `sampling.autoguidance_scale` the scale w; `validation.check_guide`
checks that the guide reads its inputs and outputs as the main model does. This module loads the
guide's params (`load`) and wraps a sampler's `model_fn` (`wrap`):

  model_fn(x, t) = (1 + w) f(x, t) - w f_guide(x, t),

i.e. D_guide + (1 + w) (D - D_guide), within the guidance interval `sampling.guidance_t_min` /
`guidance_t_max`; w = 0 is plain sampling, bitwise. A class-conditional guide is given the main
model's classes, unguided.
"""

from ddpm_jax.config import conditioning
from ddpm_jax.config import factories
from ddpm_jax.evaluation import classifier_guidance
from ddpm_jax.sampling import guidance


def load(run: factories.GuideRun | None, mesh, use_ema: bool):
  """(module, params) of the validated guide run at its step, or None when autoguidance is off
  (the same restore as classifier guidance's run: its own config's architecture, params only)."""
  return classifier_guidance.load(run, mesh, use_ema)


def wrap(config, model_fn, tables, run: factories.GuideRun, module, params, n: int,
         label: int | None = None):
  """`model_fn` autoguided by the guide (module, params) of `run`, for n samples of class
  `label` (default sampling.class_label)."""
  def cond_fn(x, t, y):
    net_fn = lambda x_, t_: module.apply({"params": params}, x_, t_, y, train=False)
    return factories.sampler_model_fn(run.config, tables, net_fn)(x, t)
  label = int(config.sampling.class_label) if label is None else int(label)
  guide_fn = conditioning.guided_model_fn(run.config, cond_fn, n, label, scale=0.0)
  return guidance.autoguidance(model_fn, guide_fn, float(config.sampling.autoguidance_scale),
                               model_var=config.diffusion.model_var,
                               interval=conditioning.guidance_interval(config))
