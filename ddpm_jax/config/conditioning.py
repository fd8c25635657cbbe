"""Labels of class-conditional models, read from a config: which classes exist, which label each
sample gets, and the guided `model_fn` a sampler calls.

A model with `model.num_classes = K > 0` learns labels 0..K-1 plus the null class K (classifier-
free guidance, Ho & Salimans 2022). `check_class_label` checks a requested label; the other checks
of these fields are in `validation`.
"""

import numpy as np

from ddpm_jax.data import digits
from ddpm_jax.data import input_pipeline
from ddpm_jax.sampling import guidance


def num_classes(config) -> int:
  return int(config.model.num_classes)


def check_class_label(config, label: int, what: str = "sampling.class_label") -> None:
  """The label `what` asks of the model: 0..K-1, or -1 for one of each class in turn (the only
  choice of an unconditional model)."""
  k = num_classes(config)
  if k == 0:
    if label != -1:
      raise ValueError(f"{what}={label} asks for a class, but the model is unconditional "
                       "(model.num_classes=0); leave it at -1.")
    return
  if not -1 <= label < k:
    raise ValueError(f"{what}={label} is out of range: valid labels are 0..{k - 1}, or -1 for "
                     "one of each class in turn.")


def dataset_num_classes(config, source=None) -> int | None:
  """Classes of the configured dataset's label feature, None when unknown; 0 when unlabelled.

  `source` is the opened train split, if the caller has it (else it is opened here)."""
  key = input_pipeline.label_key(config)
  if key is None:
    return 0
  data = config.data
  if data.dataset == "digits":
    return int(digits.load_digits_arrays(data.train_split)[1].max()) + 1
  if source is None:
    source = input_pipeline.open_source(data, data.train_split)
  classes = getattr(source, "classes", None)
  if classes:
    return len(classes)
  spec = input_pipeline.DATASETS[data.dataset]
  if spec.tfds_name:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    feature = tfds.builder(spec.tfds_name, data_dir=data.data_dir or None).info.features[key]
    return getattr(feature, "num_classes", None)
  return None


def guidance_interval(config) -> tuple[float, float]:
  """[t_min, t_max] in timestep indices; t_max = -1 means T - 1 (the whole range)."""
  s, last = config.sampling, config.diffusion.num_timesteps - 1
  t_max = float(s.guidance_t_max)
  return float(s.guidance_t_min), (last if t_max < 0 else min(t_max, last))


def labels_for(n: int, label: int, k: int) -> np.ndarray:
  """`label` for all n samples, or 0, 1, ..., k-1, 0, ... for label -1."""
  return (np.arange(n) % k if label < 0 else np.full(n, label)).astype(np.int32)


def sample_labels(config, n: int, label: int | None = None) -> np.ndarray | None:
  """Labels of n samples of the model (`label`, default sampling.class_label); None if uncond."""
  k = num_classes(config)
  if k == 0:
    return None
  return labels_for(n, int(config.sampling.class_label) if label is None else int(label), k)


def guided_model_fn(config, cond_fn, n: int, label: int | None = None,
                    scale: float | None = None):
  """model_fn(x, t) for n samples: unconditional, conditional, or classifier-free guided.

  Args:
    config: reads model.num_classes, diffusion.model_var and sampling.{class_label,
      guidance_scale, guidance_t_min, guidance_t_max}.
    cond_fn: `cond_fn(x, t, y) -> raw output`; y None = unconditional (or the null class).
    n: the batch size (labels are made for it, see `sample_labels`).
    label, scale: override sampling.class_label / sampling.guidance_scale.
  """
  labels = sample_labels(config, n, label)
  if labels is None:
    return lambda x, t: cond_fn(x, t, None)
  w = float(config.sampling.guidance_scale) if scale is None else float(scale)
  return guidance.classifier_free(cond_fn, labels, num_classes(config), w,
                                  model_var=config.diffusion.model_var,
                                  interval=guidance_interval(config))
