"""The one place where an experiment config turns into objects: name -> implementation.

Each factory owns exactly one choice (schedule, model, loss, sampler) and reads the fields of
`configs/base.py` directly. The maths modules below never see a ConfigDict. `validation.validate`
calls each factory once per run and hands the objects to the drivers in `Components`.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax.numpy as jnp
import ml_collections

from ddpm_jax import models
from ddpm_jax import sampling
from ddpm_jax.core import denoisers
from ddpm_jax.core import diffusion
from ddpm_jax.core import losses
from ddpm_jax.core import schedules


class ClassifierRun(NamedTuple):
  """The noise-conditional classifier run named by `sampling.classifier_workdir`."""

  workdir: str
  config: ml_collections.ConfigDict  # its own config.json, which fixes its architecture
  step: int  # its newest checkpoint, found once by the validator


class GuideRun(NamedTuple):
  """The weaker model of autoguidance, named by `sampling.guide_workdir` (+ `guide_step`)."""

  workdir: str
  config: ml_collections.ConfigDict  # its own config.json, which fixes its architecture
  step: int  # the checkpoint used: sampling.guide_step, or the newest


class Components(NamedTuple):
  """What a validated config builds, once: every driver uses these objects."""

  tables: schedules.DiffusionTables
  model: Any  # the Flax module: UNet, or NoisyClassifier for training.objective='classifier'
  loss_fn: Callable | None  # the training loss (train mode only)
  sample_fn: Callable | None  # the configured sampler (None for the classifier objective)
  grid_sample_fn: Callable | None  # train: DDIM with training.grid_sampler_steps, for grids
  classifier: ClassifierRun | None  # classifier guidance, when sampling.classifier_workdir
  train_source: Any = None  # train: the opened train split, read by the train iterator
  guide: GuideRun | None = None  # autoguidance, when sampling.guide_workdir


def tables_from_config(config: ml_collections.ConfigDict) -> schedules.DiffusionTables:
  """The tables every sampler walks: the schedule's (ddpm), or for an EDM or flow-matching
  network the num_timesteps levels of EDM's ladder from sigma_min to sigma_max (rho 7), on which
  `sampler_model_fn` presents it as a model of x0."""
  d = config.diffusion
  if d.parameterization != "ddpm":
    sigmas = denoisers.edm_sigmas(d.num_timesteps, float(d.sigma_min), float(d.sigma_max))
    return denoisers.tables_from_sigmas(sigmas)
  betas = schedules.get_beta_schedule(d.schedule, d.num_timesteps, d.zero_terminal_snr)
  return schedules.make_tables(betas, dtype=jnp.float32)


def create_model(config: ml_collections.ConfigDict):
  """The network of a config: the U-Net or the DiT (model.name), or the U-Net's encoder as a
  noise-conditional classifier.

  Reads config.model.{ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
  num_groups, sr_factor} for the U-Net, model.{patch_size, hidden_size, depth, num_heads,
  mlp_ratio, norm_eps} for the DiT, model.{dtype, num_classes}, config.data.num_channels and
  config.diffusion.model_var (a learned variance doubles the output channels). With
  training.objective = 'classifier' it builds the U-Net's encoder as a `NoisyClassifier` with
  model.num_classes logits (classifier guidance's p(c | x_t, t)).
  """
  m = config.model
  diffusion.check_choice("model.dtype", m.dtype, models.DTYPES)
  name = m.get("name", "unet")
  diffusion.check_choice("model.name", name, models.BACKBONES)
  channels = config.data.num_channels
  out_channels = 2 * channels if config.diffusion.model_var in diffusion.LEARNED_VARS else channels
  if name == "dit" and config.training.objective != "classifier":
    return models.DiT(patch_size=int(m.patch_size), hidden_size=int(m.hidden_size),
                      depth=int(m.depth), num_heads=int(m.num_heads), out_channels=out_channels,
                      mlp_ratio=float(m.mlp_ratio), num_classes=int(m.num_classes),
                      norm_eps=float(m.norm_eps), dtype=models.DTYPES[m.dtype])
  common = dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                resamp_with_conv=m.resamp_with_conv, num_groups=int(m.num_groups),
                dtype=models.DTYPES[m.dtype])
  if config.training.objective == "classifier":
    return models.NoisyClassifier(num_classes=int(m.num_classes), **common)
  return models.UNet(out_channels=out_channels,
                     num_classes=int(m.num_classes),
                     cond_channels=channels if m.get("sr_factor", 0) > 0 else 0, **common)


def model_output(config: ml_collections.ConfigDict) -> str:
  """What the samplers see the model predict: diffusion.model_output for a DDPM model, x0 for
  an EDM or flow-matching one (`sampler_model_fn`)."""
  d = config.diffusion
  return d.model_output if d.parameterization == "ddpm" else "x0"


def sampler_model_fn(config: ml_collections.ConfigDict, tables, net_fn: Callable) -> Callable:
  """The `model_fn(x_t, t)` every sampler calls, from the network `net_fn(x, time_input)`:
  the network itself for DDPM, else its denoiser D(x, sigma) as a model of x0 on `tables`
  (`denoisers.vp_x0_model`)."""
  d = config.diffusion
  if d.parameterization == "ddpm":
    return net_fn
  denoise = denoisers.network_denoiser(net_fn, d.parameterization, float(d.sigma_data))
  return denoisers.vp_x0_model(denoise, tables)


def loss_fn_from_config(config: ml_collections.ConfigDict, tables):
  """The training loss of `training.objective`: the diffusion loss of the parameterisation, or
  the classifier's cross-entropy on x_t (which takes the labels as a fifth argument)."""
  if config.training.objective == "classifier":
    return losses.get_classifier_loss_fn(tables)
  d = config.diffusion
  if d.parameterization == "edm":
    return losses.get_edm_loss_fn(float(d.sigma_data))
  if d.parameterization == "flow":
    return losses.get_flow_loss_fn()
  return losses.get_loss_fn(
      tables, loss=d.loss, model_output=d.model_output, model_var=d.model_var,
      weighting=d.weighting, hybrid_lambda=d.hybrid_lambda, p2_k=d.p2_k, p2_gamma=d.p2_gamma,
      min_snr_gamma=d.min_snr_gamma)


def edm_options(s: ml_collections.ConfigDict) -> dict[str, float]:
  """EDM Algorithm 2's options from `config.sampling`; s_tmax < 0 means inf."""
  s_tmax = float(s.s_tmax)
  return {"s_churn": float(s.s_churn), "s_tmin": float(s.s_tmin),
          "s_tmax": float("inf") if s_tmax < 0 else s_tmax, "s_noise": float(s.s_noise)}


def sampler_steps(config: ml_collections.ConfigDict, name: str | None = None,
                  num_steps: int | None = None) -> int:
  """Grid points of a sampler: ancestral takes all T unless it learns its variance (respaced)."""
  s, d = config.sampling, config.diffusion
  if (name or s.sampler) == "ancestral" and d.model_var not in diffusion.LEARNED_VARS:
    return d.num_timesteps
  return num_steps or s.num_steps


def sampler_from_config(config: ml_collections.ConfigDict, tables, *, sampler: str | None = None,
                        num_steps: int | None = None, trajectory_every: int = 0,
                        for_x0_model: bool = False):
  """The sampler named in `config.sampling`, optionally overriding its name and step count.

  for_x0_model: the sampler of a model of x0 that clips (or not) by itself, e.g. a zero-shot
  restoration solver's (`sampling.restoration.x0_model`): model_output 'x0', no clipping here.

  `sampling.grid` "default" is the sampler's own grid (`sampling.DEFAULT_GRIDS`). The ancestral
  sampler runs all T steps unless the model learns its variance, where `num_steps` respaces it
  (Improved DDPM sec. 4).
  """
  s, d = config.sampling, config.diffusion
  name = sampler or s.sampler
  steps = sampler_steps(config, name, num_steps)
  edm = edm_options(s) if name == "edm_stochastic" else {}
  return sampling.get_sampler(name, tables,
                              model_output="x0" if for_x0_model else model_output(config),
                              model_var=d.model_var,
                              num_steps=steps, eta=s.eta if name == "ddim" else 0.0,
                              grid=s.grid, clip_x0=d.clip_x0 and not for_x0_model,
                              trajectory_every=trajectory_every,
                              **edm)


def sampler_label(config: ml_collections.ConfigDict) -> str:
  """e.g. 'ddim_50', or 'ancestral_1000': the sampler and its grid points (not its NFE)."""
  return f"{config.sampling.sampler}_{sampler_steps(config)}"


def sampler_nfe(config: ml_collections.ConfigDict) -> int:
  """Model evaluations per sample of the configured sampler (Heun: up to 2N - 1)."""
  return sampling.nfe(config.sampling.sampler, sampler_steps(config), tables_from_config(config),
                      config.sampling.grid)
