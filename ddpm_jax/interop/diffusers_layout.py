"""diffusers' `UNet2DModel`, mapped onto ddpm_jax's U-Net and back.

Pure: dicts and numpy arrays in and out, no files, no config objects. `diffusers_io` reads and
writes the files, `diffusers_scheduler` maps the process; `importer` and `exporter` turn the
results into a workdir or a folder.

A config.json is read as diffusers reads it: a field it omits takes `UNet2DModel`'s default
(`DIFFUSERS_DEFAULTS`; the published google/ddpm-* configs, written by diffusers 0.0.4, omit
several). Then diffusers' `UNet2DModel` is DDPM's U-Net (Ho et al. 2020, appendix B) when it is
built with DDPM's settings (`REQUIRED`: sinusoidal [sin, cos] embedding with frequencies
10000^(-i / (half - 1)), GroupNorm eps 1e-6, one attention head over all channels, strided convs
padded as TF's 'SAME'), as google/ddpm-cifar10-32 and the 256x256 DDPM models are. Every
GroupNorm has `norm_num_groups` groups (DDPM's 32; ours `model.num_groups`): the middle block's
attention takes them when `attn_norm_num_groups` is None (`UNetMidBlock2D`), the other attention
blocks always do. Its weights map one to one onto ours (`key_map`): PyTorch convs are
[out, in, kh, kw] (ours HWIO), linear layers [out, in] (ours [in, out]). Attention weights appear
under the names of diffusers >= 0.14 (`to_q`, `to_k`, `to_v`, `to_out.0`) or the older ones
(`query`, `key`, `value`, `proj_attn`); both are read, the new ones written.

Class conditioning: ddpm_jax's conditional U-Net has K + 1 class-embedding rows, the last being
classifier-free guidance's null class. diffusers' `num_class_embeds` has no such row by
convention, so the exporter marks its folders with `NULL_CLASS_MARKER` (a private config key,
which diffusers ignores), and the importer reads a class-conditional model only with it.
"""

from collections.abc import Mapping
import math
import re
from typing import Any

import numpy as np

# `UNet2DModel.__init__`'s defaults (diffusers 0.42; tests/interop_test.py checks them against
# the installed diffusers): what diffusers builds for a field that a config.json omits.
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# A private config.json key (diffusers ignores keys starting with "_") that the exporter writes on
# a class-conditional model: its last class-embedding row is the null class.
NULL_CLASS_MARKER = "_ddpm_jax_null_class"

# UNet2DModel fields whose value must be DDPM's for the network to be ours; each with that value.
REQUIRED = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "act_fn": "silu",  # diffusers' "swish" is the same activation
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
_READ = tuple(k for k in DIFFUSERS_DEFAULTS if k not in REQUIRED)
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}

class LayoutError(ValueError):
  """A file that does not describe a network or process ddpm_jax can represent exactly."""


def problems_text(what: str, problems: list[str], limit: int = 20) -> str:
  """`what:` and one problem per line, the first `limit` of them."""
  shown = problems[:limit] + ([f"... and {len(problems) - limit} more"]
                              if len(problems) > limit else [])
  return f"{what}:\n  " + "\n  ".join(shown)


def arch_from_unet_config(cfg: Mapping[str, Any], default_size: int | None = None) -> dict:
  """The config fields of ddpm_jax's U-Net equal to a diffusers `UNet2DModel` config.

  Args:
    cfg: the parsed config.json; omitted fields take diffusers' defaults.
    default_size: the image side when the config has no `sample_size` (the network itself does
      not depend on it).
  Returns:
    {"data.image_size", "data.num_channels", "model.ch", "model.ch_mult",
    "model.num_res_blocks", "model.attn_resolutions", "model.resamp_with_conv",
    "model.num_groups", "model.dropout", "model.num_classes"} plus "out_channels" (C, or 2C for
    a learned variance).
  Raises:
    LayoutError: naming every field that has no ddpm_jax equivalent, with the value it needs.
  """
  name = cfg.get("_class_name", "UNet2DModel")
  if name != "UNet2DModel":
    raise LayoutError(
        f"The model is a diffusers {name}, not a UNet2DModel: ddpm_jax imports the pixel-space "
        "DDPM U-Net (UNet2DModel, as google/ddpm-cifar10-32 and google/ddpm-ema-church-256). "
        "Latent or text-conditioned U-Nets (UNet2DConditionModel) are other networks.")
  given = cfg
  cfg = {**DIFFUSERS_DEFAULTS, **cfg}
  problems = []
  for key, value in REQUIRED.items():
    got = cfg[key]
    if key == "act_fn" and got == "swish":
      continue
    if isinstance(value, float) and isinstance(got, (int, float)) and math.isclose(got, value):
      continue
    if got != value:
      absent = "" if key in given else " (absent, diffusers' default)"
      problems.append(f"{key}={got!r}{absent}: needs {value!r} ({_WHY[key]})")
  known = set(DIFFUSERS_DEFAULTS)
  for key in sorted(k for k in cfg if not k.startswith("_") and k not in known):
    problems.append(f"{key}={cfg[key]!r}: a field ddpm_jax does not know, so it cannot tell "
                    "whether it changes the network (if it is harmless, remove it from "
                    "config.json)")
  channels = cfg["block_out_channels"]
  down, up = cfg["down_block_types"], cfg["up_block_types"]
  if not all(isinstance(v, (list, tuple)) for v in (channels, down, up)) or not channels or \
      len(down) != len(channels) or len(up) != len(channels) or \
      not all(isinstance(c, int) and c > 0 for c in channels):
    problems.append(f"block_out_channels={channels!r}, down_block_types={down!r}, "
                    f"up_block_types={up!r}: need one entry per resolution level each (channels "
                    "positive integers)")
    raise LayoutError(problems_text("The UNet2DModel config has no ddpm_jax equivalent",
                                    problems))
  size = cfg["sample_size"]
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      problems.append(f"sample_size={size!r}: ddpm_jax models square images")
    size = size[0] if size else None
  if size is None:
    size = default_size
  if not isinstance(size, int) or size <= 0:
    problems.append(f"sample_size={cfg['sample_size']!r}: needs the image side (an int)")
    size = 0
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
  head_dim = cfg["attention_head_dim"]
  # Every attention block, the middle block's (at the last level's width) included, must have one
  # head over all of its channels.
  for c in sorted({channels[level] for level in attn_levels} | {channels[-1]}):
    if head_dim is not None and head_dim != c:
      absent = "" if "attention_head_dim" in given else " (absent: diffusers' default)"
      problems.append(f"attention_head_dim={head_dim!r}{absent}: attention heads of {head_dim} "
                      f"channels at {c} channels; DDPM has one head over all channels (null). "
                      'If the weights are DDPM\'s, set "attention_head_dim": null in config.json')
      break
  groups = cfg["norm_num_groups"]
  # Each GroupNorm normalises a level's width or the sum of two: dividing the widths is enough.
  if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
    problems.append(f"norm_num_groups={groups!r}: needs a positive int that divides every "
                    f"block_out_channels {list(channels)}")
  if cfg["attn_norm_num_groups"] not in (None, groups):
    problems.append(f"attn_norm_num_groups={cfg['attn_norm_num_groups']!r}: needs None or "
                    f"{groups!r} (norm_num_groups: ddpm_jax's attention norms have the "
                    "resnets' groups)")
  if cfg["time_embedding_dim"] not in (None, 4 * ch):
    problems.append(f"time_embedding_dim={cfg['time_embedding_dim']!r}: needs None or "
                    f"{4 * ch} (4 x block_out_channels[0])")
  c_in, c_out = cfg["in_channels"], cfg["out_channels"]
  if c_out not in (c_in, 2 * c_in):
    problems.append(f"out_channels={c_out} with in_channels={c_in}: needs {c_in} or {2 * c_in} "
                    "(a learned variance)")
  num_class_embeds = cfg["num_class_embeds"]
  if num_class_embeds is not None:
    if not isinstance(num_class_embeds, int) or num_class_embeds < 2:
      problems.append(f"num_class_embeds={num_class_embeds!r}: needs None or an int >= 2")
    elif not cfg.get(NULL_CLASS_MARKER):
      problems.append(
          f"num_class_embeds={num_class_embeds}: ddpm_jax's class-conditional U-Net keeps its last "
          "class-embedding row as classifier-free guidance's null class, and this folder does "
          f"not say it has one (ddpm_jax's exports carry \"{NULL_CLASS_MARKER}\": true). If "
          f"row {num_class_embeds - 1} is an unconditional class, add that key to config.json")
  if size and len(channels) > 1 and size % 2 ** (len(channels) - 1):
    problems.append(f"sample_size={size}: not divisible by 2^{len(channels) - 1}")
  if problems:
    raise LayoutError(problems_text("The UNet2DModel config has no ddpm_jax equivalent",
                                    problems))
  return {
      "data.image_size": size,
      "data.num_channels": c_in,
      "model.ch": ch,
      "model.ch_mult": tuple(c // ch for c in channels),
      "model.num_res_blocks": int(cfg["layers_per_block"]),
      "model.attn_resolutions": tuple(size // 2**level for level in attn_levels),
      "model.resamp_with_conv": True,
      "model.num_groups": groups,
      "model.dropout": float(cfg["dropout"]),
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
      "norm_num_groups": int(fields["model.num_groups"]),
      "attn_norm_num_groups": None,
      "time_embedding_dim": None,
      "num_class_embeds": num_classes + 1 if num_classes > 0 else None,
      **REQUIRED,
      **({NULL_CLASS_MARKER: True} if num_classes > 0 else {}),
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
  if leaf not in _LEAF:
    raise LayoutError(f"no diffusers name for {'/'.join(path)}")
  parts.append(_LEAF[leaf])
  return ".".join(parts)


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict:
  """{(key, ..., leaf name): leaf} of a nested param dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
  """The nested dict of `flatten_tree`'s output."""
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def key_map(shapes: Mapping, num_levels: int) -> dict[tuple[str, ...], str]:
  """{our leaf path: diffusers key} for a param tree (arrays or ShapeDtypeStructs)."""
  return {path: diffusers_key(path, num_levels) for path in flatten_tree(shapes)}


def _to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
  """A PyTorch weight in our layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]; other
  leaves (biases, norm scales, embedding tables) as they are."""
  if leaf != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


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
  leaf_shapes = {p: tuple(v.shape) for p, v in flatten_tree(shapes).items()}
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    converted = _to_ours(value, path[-1])
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
    raise LayoutError(problems_text(
        f"The weights do not fit the network their config describes ({len(problems)} problems)",
        problems))
  return unflatten_tree(out)


def state_dict_from_params(params: Mapping, num_levels: int) -> dict[str, np.ndarray]:
  """A diffusers UNet2DModel state dict (PyTorch layout, new names) of our param tree."""
  return {diffusers_key(path, num_levels): np.ascontiguousarray(_to_torch(np.asarray(v), path[-1]))
          for path, v in flatten_tree(params).items()}
