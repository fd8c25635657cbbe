"""Classifier guidance from a trained noise-conditional classifier run (Dhariwal & Nichol 2021).

`sampling.classifier_workdir` names the workdir of a `training.objective='classifier'` run and
`sampling.classifier_scale` its scale s; `validation.check_classifier` checks them. This module
loads the classifier's params (`load`, with the params-only restore and the architecture of the
run's own config.json) and wraps a sampler's `model_fn` with `sampling.guidance.
classifier_guidance` (`wrap`): the ancestral sampler gets the mean shift
mu + s Sigma grad log p(c | x_t, t) (Algorithm 1), every other sampler the eps shift
eps - s sqrt(1 - abar_t) grad log p(c | x_t, t) (Algorithm 2).

The requested classes are those of `sampling.class_label`: one class for every sample, or -1 for
0, 1, ..., K-1, 0, ... in turn; the denoiser may be unconditional or class-conditional.
"""

from ddpm_jax.config import conditioning
from ddpm_jax.config import factories
from ddpm_jax.models import noisy_classifier
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import train_state as train_state_lib
from ddpm_jax.sampling import guidance


def load(run: factories.ClassifierRun | factories.GuideRun | None, mesh, use_ema: bool):
  """(module, params) of a validated run at its step (the classifier, or autoguidance's guide),
  or None when off."""
  if run is None:
    return None
  module = factories.create_model(run.config)
  abstract = train_state_lib.abstract_params(run.config, module, mesh)
  params, _ = checkpointing.restore_params(run.workdir, abstract, use_ema=use_ema, step=run.step,
                                           hint=f"the architecture in {run.workdir}/config.json")
  return module, params


def wrap(config, model_fn, tables, module, params, n: int, sampler: str):
  """`model_fn` guided by the classifier toward `sampling.class_label` (mode by `sampler`)."""
  d = config.diffusion
  labels = conditioning.labels_for(n, int(config.sampling.class_label), module.num_classes)
  return guidance.classifier_guidance(
      model_fn, noisy_classifier.log_prob_fn(module, params), labels,
      float(config.sampling.classifier_scale), tables, model_output=d.model_output,
      model_var=d.model_var, mode="ancestral" if sampler == "ancestral" else "eps")
