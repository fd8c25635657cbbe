"""DDPM's TF1 checkpoints (Ho et al. 2020, hojonathanho/diffusion) as our U-Net's params.

The original network (diffusion_tf/models/unet.py) keeps its variables under `model/`:
  temb/dense0|1, conv_in,
  down_<l>/block_<b>/{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}, down_<l>/attn_<b>/{norm,
  q,k,v,proj_out}, down_<l>/downsample/conv, mid/{block_1,attn_1,block_2},
  up_<l>/block_<b> (b = 0..num_res_blocks), up_<l>/attn_<b>, up_<l>/upsample/conv,
  norm_out, conv_out,
each with leaves W, b (convs HWIO, dense and 1x1 "nin" layers [in, out]) or, for the GroupNorms
of tf.contrib.layers.group_norm (32 groups, eps 1e-6), gamma and beta. That is our `UNet`'s
layout name for name (models/unet.py); only the 1x1 shortcut changes form ([in, out] becomes our
conv kernel [1, 1, in, out]), and q, k, v, proj_out are our Dense layers as they are.

Training added, per variable v, the EMA shadow `v/ExponentialMovingAverage` (decay 0.9999) and
the optimiser's slots (`v/Adam`, `v/Adam_1`, ...), plus `global_step` and the like outside
`model/`. `load` takes the shadows or the raw variables and ignores everything else.
"""

from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from ddpm_jax.interop import tf_checkpoint
from ddpm_jax.models import unet as unet_lib

SCOPE = "model/"
EMA_SUFFIX = "/ExponentialMovingAverage"

# Our top-level module names -> the original's variable scopes.
_MODULES = (
    (re.compile(r"temb_dense(\d)"), "temb/dense{}"),
    (re.compile(r"(down|up)_(\d+)_res_(\d+)"), "{}_{}/block_{}"),
    (re.compile(r"(down|up)_(\d+)_attn_(\d+)"), "{}_{}/attn_{}"),
    (re.compile(r"down_(\d+)_downsample"), "down_{}/downsample"),
    (re.compile(r"up_(\d+)_upsample"), "up_{}/upsample"),
    (re.compile(r"mid_res_0"), "mid/block_1"),
    (re.compile(r"mid_attn"), "mid/attn_1"),
    (re.compile(r"mid_res_1"), "mid/block_2"),
    (re.compile(r"(conv_in|conv_out|norm_out)"), "{}"),
)
_SUBMODULES = {"shortcut": "nin_shortcut"}
_DENSE_LEAVES = {"kernel": "W", "bias": "b"}
_NORM_LEAVES = {"scale": "gamma", "bias": "beta"}


def tf_name(path: tuple[str, ...]) -> str:
  """The original's variable name of one of our param paths, e.g.
  ('down_1_res_0', 'norm1', 'norm', 'scale') -> 'model/down_1/block_0/norm1/gamma'."""
  top, *inner = path
  for pattern, template in _MODULES:
    match = pattern.fullmatch(top)
    if match:
      scope = template.format(*match.groups())
      break
  else:
    raise ValueError(f"our U-Net param {'/'.join(path)} has no counterpart in DDPM's TF1 model "
                     "(class-conditional models were never published there)")
  *modules, leaf = inner
  if modules and modules[-1] == "norm":  # GroupNorm32 wraps nn.GroupNorm as "norm"
    modules, leaf = modules[:-1], _NORM_LEAVES[leaf]
  else:
    leaf = _DENSE_LEAVES[leaf]
  names = [scope] + [_SUBMODULES.get(m, m) for m in modules] + [leaf]
  return SCOPE + "/".join(names)


def model_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The network's own variables among a checkpoint's: those under `model/` that are not the
  slot or shadow of another (`<var>/Adam`, `<var>/ExponentialMovingAverage`, ...)."""
  def is_slot(name):
    parts = name.split("/")
    return any("/".join(parts[:i]) in variables for i in range(1, len(parts)))
  return {n: v for n, v in variables.items() if n.startswith(SCOPE) and not is_slot(n)}


def _indices(names, pattern: str) -> list[int]:
  regex = re.compile(pattern)
  return sorted({int(m.group(1)) for m in map(regex.match, names) if m})


def infer_arch(variables: Mapping[str, tuple[Any, tuple[int, ...]]]) -> dict:
  """The architecture of a DDPM TF1 U-Net from its variables' shapes.

  Args:
    variables: name -> (dtype, shape), e.g. `tf_checkpoint.list_variables(prefix)`.

  Returns:
    {"ch", "ch_mult", "num_res_blocks", "attn_levels" (levels with attention, 0 = full
    resolution), "resamp_with_conv", "in_channels", "out_channels"}.

  Raises:
    ValueError: the variables are not those of a DDPM U-Net.
  """
  shapes = {n: tuple(s) for n, (_, s) in model_variables(variables).items()}
  if not shapes:
    sample = ", ".join(sorted(variables)[:5]) or "none"
    raise ValueError(f"no variables under {SCOPE!r} (found: {sample}); not a checkpoint of "
                     "DDPM's TF1 U-Net (hojonathanho/diffusion)")

  def shape(name, ndim):
    full = SCOPE + name
    if full not in shapes:
      raise ValueError(f"the checkpoint has no variable {full}: not a DDPM TF1 U-Net")
    if len(shapes[full]) != ndim:
      raise ValueError(f"variable {full} has shape {shapes[full]}, expected {ndim} dimensions")
    return shapes[full]

  _, _, in_channels, ch = shape("conv_in/W", 4)
  out_channels = shape("conv_out/W", 4)[-1]
  levels = _indices(shapes, rf"{SCOPE}down_(\d+)/")
  blocks = _indices(shapes, rf"{SCOPE}down_0/block_(\d+)/")
  for what, found in (("down_<l> levels", levels), ("down_0/block_<b> blocks", blocks)):
    if not found or found != list(range(len(found))):
      raise ValueError(f"the checkpoint's {what} are {found}, expected 0, 1, ... without gaps")
  ch_mult = []
  for level in levels:
    width = shape(f"down_{level}/block_0/conv1/W", 4)[-1]
    if width % ch:
      raise ValueError(f"{SCOPE}down_{level}/block_0/conv1/W has {width} output channels, not a "
                       f"multiple of conv_in's {ch}")
    ch_mult.append(width // ch)
  attn_levels = [lv for lv in levels if f"{SCOPE}down_{lv}/attn_0/q/W" in shapes]
  resamp_with_conv = True  # a single level has no resampling either way
  if len(levels) > 1:
    down_conv = f"{SCOPE}down_0/downsample/conv/W" in shapes
    up_conv = f"{SCOPE}up_1/upsample/conv/W" in shapes
    if down_conv != up_conv:
      raise ValueError(f"{SCOPE}down_0/downsample/conv is {'' if down_conv else 'not '}in the "
                       f"checkpoint but {SCOPE}up_1/upsample/conv is {'' if up_conv else 'not'}: "
                       "our U-Net resamples with convs on both paths or on neither")
    resamp_with_conv = down_conv
  return {"ch": int(ch), "ch_mult": tuple(ch_mult), "num_res_blocks": len(blocks),
          "attn_levels": tuple(attn_levels), "resamp_with_conv": resamp_with_conv,
          "in_channels": int(in_channels), "out_channels": int(out_channels)}


def expected_shapes(arch: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our U-Net's param shapes for `arch`, flat by path (traced only, nothing allocated)."""
  size = 2 ** len(arch["ch_mult"])  # any size works; this one keeps every level >= 2x2
  module = unet_lib.UNet(
      ch=arch["ch"], ch_mult=tuple(arch["ch_mult"]), num_res_blocks=arch["num_res_blocks"],
      attn_resolutions=tuple(size // 2**lv for lv in arch["attn_levels"]), dropout=0.0,
      resamp_with_conv=arch["resamp_with_conv"], out_channels=arch["out_channels"],
      num_groups=1)  # shapes do not depend on the groups; 1 divides every channel count
  flat = {}

  def walk(tree, path):
    for key, value in tree.items():
      if isinstance(value, Mapping):
        walk(value, path + (key,))
      else:
        flat[path + (key,)] = tuple(value.shape)
  walk(unet_lib.param_shapes(module, size, arch["in_channels"]), ())
  return flat


def plan(variables: Mapping[str, tuple[Any, tuple[int, ...]]], *,
         ema: bool) -> tuple[dict, dict[tuple[str, ...], tuple[str, tuple[int, ...]]]]:
  """Checks a checkpoint's variables against our U-Net and says where each param comes from.

  Args:
    variables: name -> (dtype, shape) of the whole checkpoint (`list_variables`).
    ema: take each variable's EMA shadow instead of the variable.

  Returns:
    (arch, sources): the inferred architecture, and for each of our param paths the checkpoint
    tensor to read and the shape it takes in our tree.

  Raises:
    ValueError: a missing, misshapen, non-float or unused model variable (all of them named,
      with both shapes), or a missing EMA shadow.
  """
  arch = infer_arch(variables)
  model_vars = model_variables(variables)
  sources, problems, used = {}, [], set()
  for path, ours in expected_shapes(arch).items():
    name = tf_name(path)
    if name not in model_vars:
      problems.append(f"missing variable {name} (our {'/'.join(path)}, shape {ours})")
      continue
    used.add(name)
    dtype, theirs = model_vars[name]
    theirs = tuple(theirs)
    if ours != theirs and not (path[-2:] == ("shortcut", "kernel") and ours == (1, 1) + theirs):
      problems.append(f"variable {name} has shape {theirs} in the checkpoint, our U-Net ({arch}) "
                      f"expects {ours}")
    elif dtype is None or not np.issubdtype(dtype, np.floating):
      problems.append(f"variable {name} has dtype {dtype}, expected a float")
    sources[path] = (name, ours)
  unused = sorted(set(model_vars) - used)
  if unused:
    problems.append(f"{len(unused)} model variable(s) that our U-Net has no place for: "
                    + ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else ""))
  if problems:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    raise ValueError("the checkpoint does not fit DDPM's U-Net as inferred from its shapes "
                     f"({arch}):\n  " + "\n  ".join(shown))
  if ema:
    for path, (name, ours) in sources.items():
      shadow = name + EMA_SUFFIX
      if shadow not in variables:
        raise ValueError(f"no EMA shadow {shadow} in the checkpoint (for {name}); import the raw "
                         "weights with --noema (ema=False)")
      if tuple(variables[shadow][1]) != tuple(model_vars[name][1]):
        raise ValueError(f"EMA shadow {shadow} has shape {tuple(variables[shadow][1])}, its "
                         f"variable {name} {tuple(model_vars[name][1])}")
      sources[path] = (shadow, ours)
  return arch, sources


def load(path: str, *, ema: bool) -> tuple[dict, dict]:
  """Reads a DDPM TF1 checkpoint into our U-Net's param tree (no TensorFlow needed).

  Everything is checked from the index (names, shapes, dtypes, EMA shadows) before any tensor
  is read; each tensor's crc32c is checked as it is read.

  Args:
    path: the checkpoint prefix (e.g. `.../model.ckpt-790000`) or a directory holding one
      (the newest, see `tf_checkpoint.resolve_checkpoint`).
    ema: True for the EMA shadows (the weights DDPM's paper evaluates), False for the raw
      variables.

  Returns:
    (params, arch): params as nested dicts of float32 NumPy arrays in exactly the layout of
    `ddpm_jax.models.UNet` (no class embedding), and the architecture (see `infer_arch`); build
    the U-Net with num_groups=32 and attn_resolutions = image_size // 2**l for l in attn_levels.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: the checkpoint is not DDPM's U-Net, lacks EMA shadows, or is corrupt.
  """
  prefix, _ = tf_checkpoint.resolve_checkpoint(path)
  arch, sources = plan(tf_checkpoint.list_variables(prefix), ema=ema)
  arrays = tf_checkpoint.read_variables(prefix, sorted({name for name, _ in sources.values()}))
  params: dict = {}
  for param_path, (name, shape) in sources.items():
    node = params
    for key in param_path[:-1]:
      node = node.setdefault(key, {})
    node[param_path[-1]] = np.asarray(arrays[name], np.float32).reshape(shape)
  return params, arch
