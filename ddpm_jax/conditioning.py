"""Checks and label plumbing of class-conditional models, run before anything compiles.

A model with `model.num_classes = K > 0` learns labels 0..K-1 plus the null class K (classifier-
free guidance, Ho & Salimans 2022). This module owns the questions "does the data have labels in
range?", "is this sampling request valid for this model?" and "which label does sample i get?".
"""

import numpy as np

from ddpm_jax import input_pipeline


def num_classes(config) -> int:
  return int(config.model.get("num_classes", 0))


def dataset_num_classes(config) -> int | None:
  """Classes of the configured dataset's label feature, None when unknown; 0 when unlabelled."""
  key = input_pipeline.label_key(config)
  if key is None:
    return 0
  data = config.data
  if data.dataset == "digits":
    return int(input_pipeline.load_digits_arrays(data.train_split)[1].max()) + 1
  source = input_pipeline._open_source(data, data.train_split)  # pylint: disable=protected-access
  classes = getattr(source, "classes", None)
  if classes:
    return len(classes)
  spec = input_pipeline.DATASETS[data.dataset]
  if spec.tfds_name:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    feature = tfds.builder(spec.tfds_name, data_dir=data.data_dir or None).info.features[key]
    return getattr(feature, "num_classes", None)
  return None


def check_training_labels(config) -> None:
  """A conditional model needs labels, all of them in [0, num_classes)."""
  k = num_classes(config)
  if k <= 0:
    return
  p = config.training.get("p_uncond", 0.0)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"training.p_uncond must be in [0, 1], got {p}.")
  have = dataset_num_classes(config)
  if have == 0:
    raise ValueError(f"model.num_classes={k} needs labels, but dataset {config.data.dataset!r} "
                     "has none (data.label_key). Train it unconditionally with "
                     "--config.model.num_classes=0, or name the label feature in data.label_key.")
  if have is not None and have > k:
    raise ValueError(f"Dataset {config.data.dataset!r} has {have} classes (labels 0..{have - 1})"
                     f" but model.num_classes={k}; set --config.model.num_classes={have}.")


def check_class_label(config, label: int, what: str = "sampling.class_label") -> None:
  k = num_classes(config)
  if k == 0:
    if label != -1:
      raise ValueError(f"{what}={label} asks for a class, but the model is unconditional "
                       "(model.num_classes=0); leave it at -1.")
    return
  if not -1 <= label < k:
    raise ValueError(f"{what}={label} is out of range: valid labels are 0..{k - 1}, or -1 for "
                     "one of each class in turn.")


def check_guidance(config) -> None:
  """Guidance needs a conditional model, a scale >= 0 and a valid t interval."""
  s = config.sampling
  w = float(s.get("guidance_scale", 0.0))
  if not (s.get("classifier_workdir", "") and num_classes(config) == 0):
    # Classifier guidance of an unconditional model checks the label against its classifier.
    check_class_label(config, int(s.get("class_label", -1)))
  if w < 0:
    raise ValueError(f"sampling.guidance_scale must be >= 0, got {w}.")
  if w > 0 and num_classes(config) == 0:
    raise ValueError(f"sampling.guidance_scale={w} needs a class-conditional model, but "
                     "model.num_classes=0; use --config.sampling.guidance_scale=0.")
  t_max = guidance_interval(config)[1]
  if not 0 <= s.get("guidance_t_min", 0.0) <= t_max:
    raise ValueError(f"sampling.guidance_t_min={s.guidance_t_min} must be in [0, {t_max}] "
                     "(guidance_t_max).")


def guidance_interval(config) -> tuple[float, float]:
  """[t_min, t_max] in timestep indices; t_max = -1 means T - 1 (the whole range)."""
  s, last = config.sampling, config.diffusion.num_timesteps - 1
  t_max = float(s.get("guidance_t_max", -1.0))
  return float(s.get("guidance_t_min", 0.0)), (last if t_max < 0 else min(t_max, last))


def sample_labels(config, n: int, label: int | None = None) -> np.ndarray | None:
  """Labels of n samples: `label` for all, or 0, 1, ..., K-1, 0, ... for -1; None if uncond."""
  k = num_classes(config)
  if k == 0:
    return None
  label = int(config.sampling.get("class_label", -1)) if label is None else int(label)
  return (np.arange(n) % k if label < 0 else np.full(n, label)).astype(np.int32)


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
  from ddpm_jax.sampling import guidance  # pylint: disable=g-import-not-at-top
  labels = sample_labels(config, n, label)
  if labels is None:
    return lambda x, t: cond_fn(x, t, None)
  w = float(config.sampling.get("guidance_scale", 0.0)) if scale is None else float(scale)
  return guidance.classifier_free(cond_fn, labels, num_classes(config), w,
                                  model_var=config.diffusion.model_var,
                                  interval=guidance_interval(config))
