"""The one place where experiment configs turn into objects.

Every string choice in a config is checked here, before anything is compiled, and each
factory below owns exactly one choice (schedule, loss, sampler). `train` and `evaluate` call
these; the maths modules never see a ConfigDict.
"""

from collections.abc import Mapping
import json

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import classifier_guidance
from ddpm_jax import conditioning
from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import losses
from ddpm_jax import sampling
from ddpm_jax import schedules
from ddpm_jax import train_state
from ddpm_jax import train_step

MODEL_DTYPES = ("float32", "bfloat16")
EVAL_METRICS = ("bpd", "fid", "digits_score")


# One choice checker for the whole package (`diffusion.check_choice`).
_check = diffusion.check_choice


def validate_config(config: ml_collections.ConfigDict, *, check_data: bool = True) -> None:
  """Fails fast, with the valid choices, on any config the run could not complete with."""
  d = config.diffusion
  # The dataset first: metrics and batch checks below depend on it.
  _check("data.dataset", config.data.dataset, input_pipeline.DATASETS)
  _check("diffusion.schedule", d.schedule, schedules.SCHEDULES)
  _check("diffusion.model_output", d.model_output, diffusion.MODEL_OUTPUTS)
  _check("diffusion.model_var", d.model_var, diffusion.MODEL_VARS)
  _check("diffusion.loss", d.loss, losses.LOSSES)
  _check("diffusion.weighting", d.weighting, losses.WEIGHTINGS)
  _check("diffusion.t_sampling", d.t_sampling, losses.T_SAMPLINGS)
  _check("training.objective", objective(config), losses.OBJECTIVES)
  if objective(config) == "classifier" and conditioning.num_classes(config) <= 0:
    raise ValueError("training.objective='classifier' needs model.num_classes > 0 (the "
                     "classifier's logits), e.g. --config.model.num_classes=10 for digits.")
  _check("model.dtype", config.model.dtype, MODEL_DTYPES)
  _check("sampling.sampler", config.sampling.sampler, sampling.SAMPLERS)
  _check("sampling.grid", config.sampling.grid, ("default", *sampling.GRIDS))
  sampling.check_edm_options("edm_stochastic", *_edm_options(config.sampling))  # Ranges.
  eval_metrics = (*config.eval.metrics, *config.training.final_eval_metrics)
  for name in eval_metrics:
    _check("eval metric", name, EVAL_METRICS)
  if "digits_score" in eval_metrics and config.data.dataset != "digits":
    raise ValueError(
        f"Eval metric 'digits_score' scores 8x8 digits only (dataset {config.data.dataset!r}); use "
        "'fid', or drop it from --config.eval.metrics / --config.training.final_eval_metrics.")
  for key in ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints"):
    if config.training[key] <= 0:
      raise ValueError(f"training.{key} must be positive, got {config.training[key]}.")
  if d.num_timesteps < 2:
    raise ValueError(f"diffusion.num_timesteps must be >= 2, got {d.num_timesteps}.")
  if d.zero_terminal_snr and d.model_output == "eps":
    raise ValueError("diffusion.zero_terminal_snr makes x0 unrecoverable from eps at t = T; use "
                     "--config.diffusion.model_output=v (Lin et al. 2023) or x0.")
  # Building the loss and the sampler checks their combinations (e.g. mse with a learned
  # variance, more sampler steps than timesteps).
  tables = tables_from_config(config)
  if float(tables.abar[-1]) == 0.0 and d.model_output == "eps" and not d.clip_x0:
    raise ValueError(f"Schedule {d.schedule!r} ends at abar_T = 0, where x0 = (x_T - eps) / 0: "
                     "eps prediction needs --config.diffusion.clip_x0=True there, or use "
                     "--config.diffusion.model_output=v.")
  loss_fn_from_config(config, tables)
  sampler_from_config(config, tables)
  n_dev = jax.device_count()
  for key, batch in [("training.batch_size", config.training.batch_size),
                     ("sampling.batch_size", config.sampling.batch_size),
                     ("eval.batch_size", config.eval.batch_size)]:
    if batch <= 0 or batch % n_dev:
      raise ValueError(
          f"{key}={batch} does not divide over the {n_dev} devices "
          f"({jax.process_count()} processes x {jax.local_device_count()} local devices); "
          f"pick a multiple of {n_dev}, e.g. --config.{key}={max(n_dev, batch // n_dev * n_dev)}.")
  conditioning.check_guidance(config)
  classifier_guidance.check(config)
  if check_data:
    input_pipeline.validate_data_config(config)
    conditioning.check_training_labels(config)


def tables_from_config(config: ml_collections.ConfigDict) -> schedules.DiffusionTables:
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.schedule, d.num_timesteps, d.zero_terminal_snr)
  return schedules.make_tables(betas, dtype=jnp.float32)


def objective(config) -> str:
  """training.objective: 'diffusion' (the denoiser, default) or 'classifier' (`losses`)."""
  return config.training.get("objective", "diffusion")


def loss_fn_from_config(config, tables):
  """The training loss of `training.objective`: the diffusion loss, or the classifier's
  cross-entropy on x_t (which takes the labels as a fifth argument)."""
  if objective(config) == "classifier":
    return losses.get_classifier_loss_fn(tables)
  d = config.diffusion
  return losses.get_loss_fn(
      tables, loss=d.loss, model_output=d.model_output, model_var=d.model_var,
      weighting=d.weighting, hybrid_lambda=d.hybrid_lambda, p2_k=d.p2_k, p2_gamma=d.p2_gamma,
      min_snr_gamma=d.min_snr_gamma)


def train_step_from_config(config, model, tables, mesh):
  """The jitted data-parallel train step of this config (see `train_step.make_train_step`)."""
  classifier = objective(config) == "classifier"
  return train_step.make_train_step(
      apply_fn=model.apply, loss_fn=loss_fn_from_config(config, tables),
      num_timesteps=config.diffusion.num_timesteps, t_sampling=config.diffusion.t_sampling,
      ema_decay=config.training.ema_decay,
      learning_rate=train_state.learning_rate_schedule(config.optim), mesh=mesh,
      skip_nonfinite=config.training.get("skip_nonfinite_updates", False),
      # The classifier's labels are its targets, not a model input.
      num_classes=0 if classifier else config.model.get("num_classes", 0),
      p_uncond=config.training.get("p_uncond", 0.0), labels_to_loss=classifier)


def sampler_from_config(config, tables, *, sampler: str | None = None, num_steps: int | None = None,
                        trajectory_every: int = 0):
  """The sampler named in `config.sampling`, optionally overriding its name and step count.

  `sampling.grid` "default" is the sampler's own grid (`sampling.DEFAULT_GRIDS`). The ancestral
  sampler from the config runs all T steps unless the model learns its variance, where
  `num_steps` respaces it (Improved DDPM sec. 4).
  """
  s, d = config.sampling, config.diffusion
  name = sampler or s.sampler
  steps = num_steps or s.num_steps
  if name == "ancestral" and d.model_var not in diffusion.LEARNED_VARS:
    steps = None
  edm = dict(zip(sampling.EDM_DEFAULTS, _edm_options(s)))
  return sampling.get_sampler(name, tables, model_output=d.model_output, model_var=d.model_var,
                              num_steps=steps, eta=s.eta if name == "ddim" else 0.0,
                              grid=s.grid, clip_x0=d.clip_x0, trajectory_every=trajectory_every,
                              **(edm if name == "edm_stochastic" else {}))


def _edm_options(s) -> tuple[float, float, float, float]:
  """(s_churn, s_tmin, s_tmax, s_noise) from `config.sampling`; s_tmax < 0 means inf."""
  s_tmax = float(s.s_tmax)
  return float(s.s_churn), float(s.s_tmin), (float("inf") if s_tmax < 0 else s_tmax), \
      float(s.s_noise)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_diff(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> dict:
  """{key: (base value, value)} for every leaf where `config` differs from `base`."""
  new, old = _flatten(config.to_dict()), _flatten(base.to_dict())
  return {k: (old.get(k), v) for k, v in sorted(new.items()) if old.get(k) != v}


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
