"""diffusers' `UNet2DModel` and DDPM schedulers, mapped onto ddpm_jax's U-Net and process.

Pure: dicts and numpy arrays in and out, no files, no config objects. `diffusers_io` reads and
writes the files; `importer` and `exporter` turn the results into a workdir or a folder.

The network. diffusers' `UNet2DModel` is DDPM's U-Net (Ho et al. 2020, appendix B) when it is
built with DDPM's settings (`REQUIRED`: sinusoidal [sin, cos] embedding with frequencies
10000^(-i / (half - 1)), GroupNorm(32, eps 1e-6), one attention head over all channels, strided
convs padded as TF's 'SAME'), as google/ddpm-cifar10-32 and the 256x256 DDPM models are. Its
weights map one to one onto ours (`key_map`): PyTorch convs are [out, in, kh, kw] (ours HWIO),
linear layers [out, in] (ours [in, out]). Attention weights appear under the names of diffusers
>= 0.14 (`to_q`, `to_k`, `to_v`, `to_out.0`) or the older ones (`query`, `key`, `value`,
`proj_attn`); both are read, the new ones written.

The process. A scheduler config gives T, the betas, the prediction type, the variance and
clipping; `process_from_scheduler` matches its betas against `core.schedules.SCHEDULES` (to 1e-12)
rather than trusting names, so e.g. diffusers' `scaled_linear` over [1e-4, 0.02] is our `quad`.
"""

from collections.abc import Mapping
import math
import re
from typing import Any

import numpy as np

from ddpm_jax.core import schedules

# UNet2DModel fields whose value must be DDPM's for the network to be ours; each with that value.
REQUIRED = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "class_embed_type": None,
}
# Why each required value matters, for the error message.
_WHY = {
    "time_embedding_type": "DDPM's sinusoidal timestep embedding",
    "flip_sin_to_cos": "the embedding is [sin, cos]",
    "freq_shift": "frequencies 10000^(-i / (half - 1))",
    "norm_num_groups": "GroupNorm with 32 groups",
    "norm_eps": "GroupNorm epsilon 1e-6",
    "act_fn": "swish activations",
    "downsample_padding": "strided convs padded as TF's 'SAME' (right and bottom)",
    "downsample_type": "strided-conv downsampling",
    "upsample_type": "nearest-neighbour upsampling followed by a conv",
    "resnet_time_scale_shift": "the timestep embedding added as a bias, not a scale-shift",
    "add_attention": "attention in the middle block",
    "center_input_sample": "inputs already in [-1, 1]",
    "mid_block_type": "DDPM's middle block",
    "mid_block_scale_factor": "no rescaling in the middle block",
    "class_embed_type": "a class embedding table (num_class_embeds) or none",
}
# Fields read from the config (the rest of `UNet2DModel`'s signature is in REQUIRED).
_READ = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
         "down_block_types", "up_block_types", "dropout", "attention_head_dim",
         "attn_norm_num_groups", "time_embedding_dim", "num_class_embeds", "num_train_timesteps")
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}

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


class LayoutError(ValueError):
  """A file that does not describe a network or process ddpm_jax can represent exactly."""


def _problems_text(what: str, problems: list[str]) -> str:
  return f"{what}:\n  " + "\n  ".join(problems)


def arch_from_unet_config(cfg: Mapping[str, Any]) -> dict:
  """The config fields of ddpm_jax's U-Net equal to a diffusers `UNet2DModel` config.

  Returns:
    {"data.image_size", "data.num_channels", "model.ch", "model.ch_mult",
    "model.num_res_blocks", "model.attn_resolutions", "model.resamp_with_conv",
    "model.dropout", "model.num_classes"} plus "out_channels" (C, or 2C for a learned variance).
  Raises:
    LayoutError: naming every field that has no ddpm_jax equivalent, with the value it needs.
  """
  name = cfg.get("_class_name", "UNet2DModel")
  if name != "UNet2DModel":
    raise LayoutError(
        f"The model is a diffusers {name}, not a UNet2DModel: ddpm_jax imports the pixel-space "
        "DDPM U-Net (UNet2DModel, as google/ddpm-cifar10-32 and google/ddpm-ema-church-256). "
        "Latent or text-conditioned U-Nets (UNet2DConditionModel) are other networks.")
  problems = []
  for key, value in REQUIRED.items():
    got = cfg.get(key, value if key in ("mid_block_type", "class_embed_type") else "<absent>")
    if isinstance(value, float) and isinstance(got, (int, float)) and math.isclose(got, value):
      continue
    if got != value:
      problems.append(f"{key}={got!r}: needs {value!r} ({_WHY[key]})")
  known = set(REQUIRED) | set(_READ)
  for key in sorted(k for k in cfg if not k.startswith("_") and k not in known):
    problems.append(f"{key}={cfg[key]!r}: a field ddpm_jax does not know; cannot tell whether it "
                    "changes the network")
  channels = list(cfg.get("block_out_channels") or [])
  down, up = list(cfg.get("down_block_types") or []), list(cfg.get("up_block_types") or [])
  size = cfg.get("sample_size")
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      problems.append(f"sample_size={size!r}: ddpm_jax models square images")
    size = size[0]
  if not isinstance(size, int) or size <= 0:
    problems.append(f"sample_size={cfg.get('sample_size')!r}: needs the image side (an int)")
    size = 0
  if not channels or len(down) != len(channels) or len(up) != len(channels):
    problems.append(f"block_out_channels={channels!r}, down_block_types={down!r}, "
                    f"up_block_types={up!r}: need one entry per resolution level each")
    raise LayoutError(_problems_text("The UNet2DModel config has no ddpm_jax equivalent",
                                     problems))
  ch = channels[0]
  if any(c % ch for c in channels):
    problems.append(f"block_out_channels={channels!r}: each must be a multiple of the first")
  bad_down = [t for t in down if t not in _DOWN]
  bad_up = [t for t in up if t not in _UP]
  if bad_down or bad_up:
    problems.append(f"block types {sorted(set(bad_down + bad_up))}: ddpm_jax has "
                    f"{sorted(_DOWN)} and {sorted(_UP)}")
  attn_levels = tuple(level for level, t in enumerate(down) if _DOWN.get(t))
  up_attn = tuple(len(up) - 1 - j for j, t in enumerate(up) if _UP.get(t))
  if not bad_down and not bad_up and sorted(up_attn) != sorted(attn_levels):
    problems.append(f"down_block_types={down!r} and up_block_types={up!r}: attention must be at "
                    "the same resolutions on the way down and up")
  head_dim = cfg.get("attention_head_dim")
  for level in attn_levels:
    if head_dim is not None and head_dim != channels[level]:
      problems.append(f"attention_head_dim={head_dim!r}: {channels[level] // head_dim} heads at "
                      f"{channels[level]} channels; DDPM has one head over all channels (None)")
      break
  if cfg.get("attn_norm_num_groups") not in (None, 32):
    problems.append(f"attn_norm_num_groups={cfg.get('attn_norm_num_groups')!r}: needs None or 32")
  if cfg.get("time_embedding_dim") not in (None, 4 * ch):
    problems.append(f"time_embedding_dim={cfg.get('time_embedding_dim')!r}: needs None or "
                    f"{4 * ch} (4 x block_out_channels[0])")
  c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
  if c_out not in (c_in, 2 * c_in):
    problems.append(f"out_channels={c_out} with in_channels={c_in}: needs {c_in} or {2 * c_in} "
                    "(a learned variance)")
  num_class_embeds = cfg.get("num_class_embeds")
  if num_class_embeds is not None and num_class_embeds < 2:
    problems.append(f"num_class_embeds={num_class_embeds}: needs None or at least 2 (K classes "
                    "and the null class)")
  if size and len(channels) > 1 and size % 2 ** (len(channels) - 1):
    problems.append(f"sample_size={size}: not divisible by 2^{len(channels) - 1}")
  if problems:
    raise LayoutError(_problems_text("The UNet2DModel config has no ddpm_jax equivalent",
                                     problems))
  return {
      "data.image_size": size,
      "data.num_channels": c_in,
      "model.ch": ch,
      "model.ch_mult": tuple(c // ch for c in channels),
      "model.num_res_blocks": int(cfg.get("layers_per_block", 2)),
      "model.attn_resolutions": tuple(size // 2**level for level in attn_levels),
      "model.resamp_with_conv": True,
      "model.dropout": float(cfg.get("dropout", 0.0)),
      "model.num_classes": 0 if num_class_embeds is None else num_class_embeds - 1,
      "out_channels": c_out,
  }


def unet_config_from_arch(fields: Mapping[str, Any]) -> dict:
  """The `UNet2DModel` config of ddpm_jax's U-Net (the inverse of `arch_from_unet_config`).

  Args:
    fields: the keys `arch_from_unet_config` returns.
  Raises:
    LayoutError: for a U-Net that UNet2DModel cannot express (average-pool resampling).
  """
  if not fields["model.resamp_with_conv"]:
    raise LayoutError("model.resamp_with_conv=False (average-pool downsampling, upsampling "
                      "without a conv): diffusers' UNet2DModel always resamples with convs.")
  size, ch = fields["data.image_size"], fields["model.ch"]
  mult = tuple(fields["model.ch_mult"])
  attn = [size // 2**level in tuple(fields["model.attn_resolutions"]) for level in range(len(mult))]
  num_classes = int(fields["model.num_classes"])
  return {
      "_class_name": "UNet2DModel",
      "sample_size": size,
      "in_channels": fields["data.num_channels"],
      "out_channels": fields["out_channels"],
      "block_out_channels": [ch * m for m in mult],
      "layers_per_block": fields["model.num_res_blocks"],
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "dropout": fields["model.dropout"],
      "attention_head_dim": None,
      "attn_norm_num_groups": None,
      "time_embedding_dim": None,
      "num_class_embeds": num_classes + 1 if num_classes > 0 else None,
      **REQUIRED,
  }


# Our module names -> diffusers' module paths. {l}: level, {j}: diffusers' up-block index.
_BLOCK_RULES = (
    (re.compile(r"down_(\d+)_res_(\d+)$"), "down_blocks.{0}.resnets.{1}"),
    (re.compile(r"down_(\d+)_attn_(\d+)$"), "down_blocks.{0}.attentions.{1}"),
    (re.compile(r"down_(\d+)_downsample$"), "down_blocks.{0}.downsamplers.0"),
    (re.compile(r"up_(\d+)_res_(\d+)$"), "up_blocks.{j}.resnets.{1}"),
    (re.compile(r"up_(\d+)_attn_(\d+)$"), "up_blocks.{j}.attentions.{1}"),
    (re.compile(r"up_(\d+)_upsample$"), "up_blocks.{j}.upsamplers.0"),
)
_FIXED = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
          "mid_res_0": "mid_block.resnets.0", "mid_attn": "mid_block.attentions.0",
          "mid_res_1": "mid_block.resnets.1", "conv_in": "conv_in", "conv_out": "conv_out",
          "norm_out": "conv_norm_out", "class_emb": "class_embedding"}
# Inside a block: our submodule path -> diffusers' (resnets and attentions share no names).
_INNER = {("norm1", "norm"): "norm1", ("conv1",): "conv1", ("temb_proj",): "time_emb_proj",
          ("norm2", "norm"): "norm2", ("conv2",): "conv2", ("shortcut",): "conv_shortcut",
          ("norm", "norm"): "group_norm", ("q",): "to_q", ("k",): "to_k", ("v",): "to_v",
          ("proj_out",): "to_out.0", ("conv",): "conv", ("norm",): ""}
# Older diffusers attention names (read, never written).
LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def _module_path(top: str, num_levels: int) -> str:
  if top in _FIXED:
    return _FIXED[top]
  for pattern, template in _BLOCK_RULES:
    m = pattern.match(top)
    if m:
      return template.format(*m.groups(), j=num_levels - 1 - int(m.group(1)))
  raise LayoutError(f"no diffusers name for the U-Net module {top!r}")


def diffusers_key(path: tuple[str, ...], num_levels: int) -> str:
  """The diffusers state-dict key of one of our param leaves, e.g.
  ('down_0_res_1', 'norm1', 'norm', 'scale') -> 'down_blocks.0.resnets.1.norm1.weight'."""
  top, *inner, leaf = path
  parts = [_module_path(top, num_levels)]
  if inner:
    sub = _INNER.get(tuple(inner))
    if sub is None:
      raise LayoutError(f"no diffusers name for {'/'.join(path)}")
    if sub:
      parts.append(sub)
  parts.append(_LEAF[leaf])
  return ".".join(parts)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def key_map(shapes: Mapping, num_levels: int) -> dict[tuple[str, ...], str]:
  """{our leaf path: diffusers key} for a param tree (arrays or ShapeDtypeStructs)."""
  return {path: diffusers_key(path, num_levels) for path in _flatten(shapes)}


def _to_ours(value: np.ndarray, ndim: int, leaf: str) -> np.ndarray:
  """A PyTorch weight in our layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]; other
  leaves (biases, norm scales, embedding tables) as they are."""
  if leaf != "kernel":
    return value
  if value.ndim == 4 and ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 4 and ndim == 2 and value.shape[2:] == (1, 1):  # a 1x1 conv as a linear
    return value[:, :, 0, 0].T
  if value.ndim == 2 and ndim == 2:
    return value.T
  return value


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T
  return value


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Mapping,
                           num_levels: int) -> dict:
  """Our param tree (float32 numpy) from a diffusers UNet2DModel state dict.

  Args:
    state_dict: diffusers key -> array (PyTorch layout), new or legacy attention names.
    shapes: our param tree of the same architecture (leaves with `.shape`), e.g.
      `models.unet.param_shapes`.
    num_levels: len(model.ch_mult).
  Raises:
    LayoutError: naming every missing key, unexpected key and shape mismatch (both shapes).
  """
  remaining = dict(state_dict)
  flat, problems = {}, []
  for path, key in key_map(shapes, num_levels).items():
    found = key
    if found not in remaining:
      module, leaf = key.rsplit(".", 1)
      for new, old in LEGACY_NAMES.items():
        if module.endswith("." + new):
          legacy = f"{module[: -len(new)]}{old}.{leaf}"
          if legacy in remaining:
            found = legacy
    if found not in remaining:
      problems.append(f"missing {key} (for {'/'.join(path)})")
      continue
    flat[path] = remaining.pop(found)
  leaf_shapes = {p: tuple(v.shape) for p, v in _flatten(shapes).items()}
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    converted = _to_ours(value, len(leaf_shapes[path]), path[-1])
    if tuple(converted.shape) != leaf_shapes[path]:
      problems.append(f"shape of {diffusers_key(path, num_levels)}: file {tuple(value.shape)} "
                      f"(ours {tuple(converted.shape)}) vs model {leaf_shapes[path]} (for "
                      f"{'/'.join(path)})")
      continue
    out[path] = np.ascontiguousarray(converted, dtype=np.float32)
  for key in sorted(remaining):
    problems.append(f"unexpected {key} {tuple(np.shape(remaining[key]))}: the config describes "
                    "no such layer")
  if problems:
    raise LayoutError(_problems_text(
        f"The weights do not fit the network their config describes ({len(problems)} problems)",
        problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])))
  return _unflatten(out)


def state_dict_from_params(params: Mapping, num_levels: int) -> dict[str, np.ndarray]:
  """A diffusers UNet2DModel state dict (PyTorch layout, new names) of our param tree."""
  return {diffusers_key(path, num_levels): np.ascontiguousarray(_to_torch(np.asarray(v), path[-1]))
          for path, v in _flatten(params).items()}


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
                      f"{', '.join(SCHEDULERS)} configs")
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
      if ours.shape == betas.shape and np.allclose(ours, betas, rtol=1e-9, atol=1e-12):
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
    # DDIM/PNDM configs carry no variance: DDPM's published setting (fixed_large on CIFAR-10,
    # fixed_small on the 256x256 models).
    variance = "fixed_large" if image_size <= 32 else "fixed_small"
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
    raise LayoutError(_problems_text(f"The {name} config has no ddpm_jax equivalent", problems))
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
    raise LayoutError(_problems_text("diffusers cannot express this model's process", problems))
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
