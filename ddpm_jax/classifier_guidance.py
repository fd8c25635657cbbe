"""Classifier guidance from a trained noise-conditional classifier run (Dhariwal & Nichol 2021).

`sampling.classifier_workdir` names the workdir of a `training.objective='classifier'` run and
`sampling.classifier_scale` its scale s. This module owns the checks made before anything
compiles (`check`), loading the classifier's params with the params-only restore (`load`, using
the architecture in the run's own config.json), and wrapping a sampler's `model_fn` with
`sampling.guidance.classifier_guidance` (`wrap`): the ancestral sampler gets the mean shift
mu + s Sigma grad log p(c | x_t, t) (Algorithm 1), every other sampler the eps shift
eps - s sqrt(1 - abar_t) grad log p(c | x_t, t) (Algorithm 2).

The requested classes are those of `sampling.class_label`: one class for every sample, or -1 for
0, 1, ..., K-1, 0, ... in turn; the denoiser may be unconditional or class-conditional.
"""

import json

from etils import epath
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import conditioning
from ddpm_jax import models
from ddpm_jax import train_state as train_state_lib
from ddpm_jax.models import classifier as classifier_lib
from ddpm_jax.sampling import guidance


def workdir(config) -> str:
  return str(config.sampling.get("classifier_workdir", ""))


def classifier_config(run_dir: str) -> ml_collections.ConfigDict:
  """The classifier run's own config (its config.json), which fixes its architecture."""
  path = epath.Path(run_dir) / "config.json"
  if not path.exists():
    raise ValueError(f"sampling.classifier_workdir={run_dir}: no config.json there; train a "
                     "classifier first, e.g. python -m ddpm_jax.main "
                     f"--config=configs/digits_classifier_noisy.py --workdir={run_dir}.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def check(config) -> None:
  """Fails before compile on a bad classifier-guidance request; does nothing when it is off."""
  run_dir, s = workdir(config), config.sampling
  if not run_dir:
    return
  scale = float(s.get("classifier_scale", 0.0))
  if scale < 0:
    raise ValueError(f"sampling.classifier_scale must be >= 0, got {scale}.")
  cconfig = classifier_config(run_dir)
  if cconfig.training.get("objective", "diffusion") != "classifier":
    raise ValueError(f"sampling.classifier_workdir={run_dir} holds a run with training.objective="
                     f"{cconfig.training.get('objective', 'diffusion')!r}, not a classifier "
                     "(configs/digits_classifier_noisy.py).")
  manager = checkpointing.create_manager(run_dir, keep=None, read_only=True)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise ValueError(f"sampling.classifier_workdir={run_dir} has no checkpoint in "
                     f"{checkpointing.checkpoint_dir(run_dir)}; train the classifier first.")
  shape = lambda c: (c.data.image_size, c.data.num_channels)
  if shape(cconfig) != shape(config):
    raise ValueError(f"The classifier in {run_dir} takes {shape(cconfig)} (image_size, "
                     f"num_channels) images, the model makes {shape(config)}.")
  k, k_model = int(cconfig.model.num_classes), conditioning.num_classes(config)
  if k_model and k_model != k:
    raise ValueError(f"The classifier in {run_dir} has {k} classes, the conditional model "
                     f"{k_model}; they must name the same classes.")
  label = int(s.get("class_label", -1))
  if not -1 <= label < k:
    raise ValueError(f"sampling.class_label={label} is out of range for the classifier in "
                     f"{run_dir}: valid target classes are 0..{k - 1}, or -1 for one of each in "
                     "turn.")


def load(config, mesh):
  """(module, params) of the classifier in `sampling.classifier_workdir`, or None when off."""
  run_dir = workdir(config)
  if not run_dir:
    return None
  cconfig = classifier_config(run_dir)
  module = models.create_model(cconfig)
  abstract = train_state_lib.abstract_params(cconfig, module, mesh)
  params, _ = checkpointing.restore_params(run_dir, abstract, use_ema=config.sampling.use_ema,
                                           hint=f"the architecture in {run_dir}/config.json")
  return module, params


def target_labels(config, n: int, num_classes: int) -> np.ndarray:
  """`sampling.class_label` for all n samples, or 0, 1, ..., K-1, 0, ... for -1."""
  label = int(config.sampling.get("class_label", -1))
  return (np.arange(n) % num_classes if label < 0 else np.full(n, label)).astype(np.int32)


def wrap(config, model_fn, tables, module, params, n: int, sampler: str):
  """`model_fn` guided by the classifier toward `target_labels` (mode chosen by `sampler`)."""
  d = config.diffusion
  return guidance.classifier_guidance(
      model_fn, classifier_lib.log_prob_fn(module, params),
      target_labels(config, n, module.num_classes), float(config.sampling.classifier_scale),
      tables, model_output=d.model_output, model_var=d.model_var,
      mode="ancestral" if sampler == "ancestral" else "eps")
