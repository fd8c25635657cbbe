"""The rules of the backbone's settings on a config (`model.*`), checked by `validation.validate`
before any compile: the U-Net's GroupNorm groups, the DiT's sizes, and what only the U-Net has.
"""

import math

import ml_collections

from ddpm_jax import models
from ddpm_jax.core import diffusion


def check_model(config: ml_collections.ConfigDict) -> None:
  """The backbone's settings: for the U-Net, model.num_groups divides every channel count its
  GroupNorms normalise (the classifier's encoder normalises a subset of them); for the DiT, see
  `check_dit`."""
  m = config.model
  diffusion.check_choice("model.name", m.get("name", "unet"), models.BACKBONES)
  if m.get("name", "unet") == "dit":
    check_dit(config)
    return
  groups = m.num_groups
  counts = models.group_norm_channels(int(m.ch), tuple(m.ch_mult), int(m.num_res_blocks))
  if not isinstance(groups, int) or groups < 1 or any(c % groups for c in counts):
    gcd = math.gcd(*counts)
    valid = ", ".join(str(g) for g in range(1, gcd + 1) if gcd % g == 0)
    raise ValueError(
        f"model.num_groups={groups!r} must divide every channel count the U-Net's GroupNorms "
        f"normalise: {', '.join(map(str, counts))} (model.ch={m.ch} x model.ch_mult="
        f"{tuple(m.ch_mult)}, and the skip concatenations). Valid choices: {valid}.")


def check_dit(config: ml_collections.ConfigDict) -> None:
  """The DiT's sizes fit the images, and nothing asks it for what only the U-Net has."""
  m, size = config.model, int(config.data.image_size)
  positive = {k: m[k] for k in ("patch_size", "hidden_size", "depth", "num_heads")}
  bad = {k: v for k, v in positive.items() if not isinstance(v, int) or v < 1}
  if bad:
    raise ValueError("model." + ", model.".join(f"{k}={v!r}" for k, v in bad.items()) +
                     ": the DiT's sizes must be positive integers.")
  if size % m.patch_size:
    valid = [p for p in range(1, size + 1) if size % p == 0]
    raise ValueError(f"model.patch_size={m.patch_size} must divide data.image_size={size}; "
                     f"valid choices: {valid}.")
  if m.hidden_size % m.num_heads or m.hidden_size % 4:
    raise ValueError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads="
                     f"{m.num_heads} (the heads' width) and by 4 (the 2-D sin-cos position "
                     "embedding).")
  if not m.mlp_ratio > 0 or not m.norm_eps > 0:
    raise ValueError(f"model.mlp_ratio={m.mlp_ratio} and model.norm_eps={m.norm_eps} must be "
                     "positive.")
  unet_only = {"model.sr_factor": (int(m.get("sr_factor", 0)), 0, "a super-resolution stage"),
               "model.dropout": (m.dropout, 0.0, "dropout (DiT has none)"),
               "training.objective": (config.training.objective, "diffusion",
                                      "the noisy classifier of classifier guidance")}
  for key, (value, need, what) in unet_only.items():
    if value != need:
      raise ValueError(f"{key}={value!r}: {what} is the U-Net's only; with model.name='dit' set "
                       f"--config.{key}={need!r}, or use --config.model.name=unet.")
