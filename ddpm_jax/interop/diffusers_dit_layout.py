"""diffusers' `DiTTransformer2DModel`, mapped onto ddpm_jax's DiT and back.

Pure: dicts and numpy arrays in and out, no files, no config objects (as `diffusers_layout` for
the U-Net). The network is ours (`models.dit`) when the config has DiT's settings (`REQUIRED`):
adaLN-Zero blocks, tanh-GELU MLPs of ratio 4, LayerNorms without affine params, biased attention.

Weights map one to one (`_KEYS`), PyTorch's linear layers being [out, in] (ours [in, out]) and the
patch embedding a p x p conv of stride p, [d, C, p, p] (ours a Linear on patches flattened as
(row, col, channel), [p*p*C, d]). Two differences of form:
  * every diffusers block holds its own time and label embedder (`norm1.emb`), and the final
    layer reads block 0's; DiT has one. Converted checkpoints carry identical copies: the
    importer takes them only when all copies are equal, and the exporter writes the copies.
  * diffusers' label table always has `num_embeds_ada_norm + 1` rows, the last being classifier-
    free guidance's null class, as ours. An unconditional diffusers DiT (num_embeds_ada_norm = 0)
    still adds its one row to the conditioning: the importer folds it into the time MLP's last
    bias (the same sum), and the exporter writes a zero row.

diffusers' `sample_size` is the token grid's input size: for the published DiT-XL-2 models it is
32, the 4-channel latents of Stable Diffusion's VAE for 256 px images. Those are latent-space
models; ours is pixel-space, and `arch_from_dit_config` refuses them naming the mismatch.
"""

from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from ddpm_jax.interop import diffusers_layout

CLASS_NAME = "DiTTransformer2DModel"
# `DiTTransformer2DModel.__init__`'s defaults (diffusers 0.42; checked by tests/dit_test.py).
DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
    "num_layers": 28, "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True,
    "sample_size": 32, "patch_size": 2, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "upcast_attention": False, "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
# Fields whose value must be DiT's for the network to be ours, with why.
REQUIRED = {
    "norm_type": ("ada_norm_zero", "adaLN-Zero blocks"),
    "activation_fn": ("gelu-approximate", "tanh-GELU MLPs"),
    "norm_elementwise_affine": (False, "LayerNorms without affine parameters"),
    "attention_bias": (True, "biased q, k, v and output projections"),
}
_EMB = "transformer_blocks.{i}.norm1.emb."
# Our (module path) -> diffusers' module, per block (`{i}`) and for the whole model.
_BLOCK_KEYS = {
    ("adaLN",): "transformer_blocks.{i}.norm1.linear",
    ("attn", "q"): "transformer_blocks.{i}.attn1.to_q",
    ("attn", "k"): "transformer_blocks.{i}.attn1.to_k",
    ("attn", "v"): "transformer_blocks.{i}.attn1.to_v",
    ("attn", "proj"): "transformer_blocks.{i}.attn1.to_out.0",
    ("mlp_fc1",): "transformer_blocks.{i}.ff.net.0.proj",
    ("mlp_fc2",): "transformer_blocks.{i}.ff.net.2",
}
_TOP_KEYS = {
    ("patch_embed",): "pos_embed.proj",
    ("final_adaLN",): "proj_out_1",
    ("final_proj",): "proj_out_2",
}
# The shared conditioning, copied into every diffusers block.
_EMB_KEYS = {
    ("t_fc1",): _EMB + "timestep_embedder.linear_1",
    ("t_fc2",): _EMB + "timestep_embedder.linear_2",
    ("class_emb",): _EMB + "class_embedder.embedding_table",
}
_LEAF = {"kernel": "weight", "bias": "bias", "embedding": "weight"}
_BLOCK = re.compile(r"^block_(\d+)$")


def is_dit_config(cfg: Mapping[str, Any]) -> bool:
  """Whether a diffusers config.json describes a `DiTTransformer2DModel`."""
  return cfg.get("_class_name") == CLASS_NAME


def arch_from_dit_config(cfg: Mapping[str, Any], num_channels: int) -> dict:
  """Our config fields (dotted keys) of a diffusers DiT config, plus "out_channels".

  Args:
    cfg: the config.json, as diffusers reads it (omitted fields take `DIFFUSERS_DEFAULTS`).
    num_channels: the pixel channels of the config the model is imported into.

  Raises:
    diffusers_layout.LayoutError: naming every field that is not DiT's, or a latent-space model.
  """
  c = {**DIFFUSERS_DEFAULTS, **cfg}
  problems = [f"{k}={c[k]!r}, but ddpm_jax's DiT has {why} ({k}={need!r})"
              for k, (need, why) in REQUIRED.items() if c[k] != need]
  if c["in_channels"] != num_channels:
    problems.append(
        f"in_channels={c['in_channels']}: this is a latent-space DiT (the published DiT-XL-2 "
        "models are trained on the 4-channel latents of Stable Diffusion's VAE, sample_size "
        f"{c['sample_size']} latents for {8 * c['sample_size']} px images), but ddpm_jax's DiT "
        f"runs on pixels and this config has data.num_channels={num_channels}. Import a "
        "pixel-space DiT (one exported by ddpm_jax, or trained on images of that many channels)"
        if c["in_channels"] == 4 and num_channels != 4 else
        f"in_channels={c['in_channels']}, but this config has data.num_channels={num_channels}; "
        f"set --config.data.num_channels={c['in_channels']} for a pixel-space model of that many "
        "channels")
  if problems:
    raise diffusers_layout.LayoutError(diffusers_layout.problems_text(
        f"{CLASS_NAME} config not importable", problems))
  out = c["out_channels"] or c["in_channels"]
  heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
  return {
      "data.image_size": int(c["sample_size"]), "data.num_channels": int(c["in_channels"]),
      "model.name": "dit", "model.patch_size": int(c["patch_size"]),
      "model.hidden_size": heads * head_dim, "model.depth": int(c["num_layers"]),
      "model.num_heads": heads, "model.mlp_ratio": 4.0,
      "model.num_classes": int(c["num_embeds_ada_norm"] or 0),
      "model.norm_eps": float(c["norm_eps"]), "model.dropout": 0.0, "model.sr_factor": 0,
      "out_channels": int(out),
  }


def dit_config_from_arch(fields: Mapping[str, Any]) -> dict:
  """The diffusers config.json of our DiT (the inverse of `arch_from_dit_config`)."""
  if float(fields["model.mlp_ratio"]) != 4.0:
    raise diffusers_layout.LayoutError(
        f"model.mlp_ratio={fields['model.mlp_ratio']}: diffusers' DiT has MLPs of ratio 4.")
  heads = int(fields["model.num_heads"])
  return {
      "_class_name": CLASS_NAME, "num_attention_heads": heads,
      "attention_head_dim": int(fields["model.hidden_size"]) // heads,
      "in_channels": int(fields["data.num_channels"]),
      "out_channels": int(fields["out_channels"]), "num_layers": int(fields["model.depth"]),
      "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True,
      "sample_size": int(fields["data.image_size"]), "patch_size": int(fields["model.patch_size"]),
      "activation_fn": "gelu-approximate", "num_embeds_ada_norm": int(fields["model.num_classes"]),
      "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
      "norm_eps": float(fields["model.norm_eps"]),
  }


def _module(path: tuple[str, ...]) -> tuple[str, int | None]:
  """(diffusers module name with `{i}` for a block's, block index or None) of our module path."""
  m = _BLOCK.match(path[0])
  if m:
    return _BLOCK_KEYS[path[1:]], int(m.group(1))
  if path in _TOP_KEYS:
    return _TOP_KEYS[path], None
  return _EMB_KEYS[path], None


def _patch_to_torch(kernel: np.ndarray, p: int) -> np.ndarray:
  """Our patch Linear [p*p*C, d] as diffusers' conv weight [d, C, p, p]."""
  c = kernel.shape[0] // (p * p)
  return kernel.reshape(p, p, c, -1).transpose(3, 2, 0, 1)


def _patch_to_ours(weight: np.ndarray) -> np.ndarray:
  d, c, p, _ = weight.shape
  return weight.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def _to_torch(path: tuple[str, ...], value: np.ndarray, p: int) -> np.ndarray:
  if path == ("patch_embed", "kernel"):
    return _patch_to_torch(value, p)
  return value.T if path[-1] == "kernel" else value


def state_dict_from_params(params: Mapping, depth: int, patch_size: int,
                           hidden_size: int) -> dict[str, np.ndarray]:
  """diffusers' state dict of our DiT params (numpy), the conditioning copied into each block
  and, for an unconditional model, a zero one-row label table."""
  out = {}
  flat = diffusers_layout.flatten_tree(params)
  if ("class_emb", "embedding") not in flat:
    flat[("class_emb", "embedding")] = np.zeros((1, hidden_size), np.float32)
  for path, value in flat.items():
    module, block = _module(path[:-1])
    value = np.asarray(_to_torch(path, np.asarray(value), patch_size))
    name = f"{module}.{_LEAF[path[-1]]}"
    for i in ([block] if block is not None else
              range(depth) if "{i}" in name else [None]):
      out[name.format(i=i)] = value
  return out


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Mapping) -> dict:
  """Our DiT param tree from diffusers' state dict, for the tree of `shapes` (ShapeDtypeStructs,
  e.g. `models.param_shapes`).

  Raises:
    diffusers_layout.LayoutError: naming missing, unexpected or misshapen weights, and blocks
      whose embedder copies differ.
  """
  flat = diffusers_layout.flatten_tree(shapes)
  depth = 1 + max(int(_BLOCK.match(p[0]).group(1)) for p in flat if _BLOCK.match(p[0]))
  conditional = ("class_emb", "embedding") in flat
  used, problems, out = set(), [], {}

  def take(name: str) -> np.ndarray | None:
    if name not in state_dict:
      problems.append(f"{name}: missing")
      return None
    used.add(name)
    return np.asarray(state_dict[name], np.float32)

  for path, shape in flat.items():
    module, block = _module(path[:-1])
    name = f"{module}.{_LEAF[path[-1]]}"
    if block is not None:
      value = take(name.format(i=block))
    elif "{i}" in name:
      copies = [take(name.format(i=i)) for i in range(depth)]
      if any(c is None for c in copies):
        continue
      differ = [i for i in range(1, depth) if not np.array_equal(copies[i], copies[0])]
      if differ:
        problems.append(f"{name.format(i=differ[0])} differs from block 0's copy: ddpm_jax's DiT "
                        "has one time and label embedder, and takes a diffusers DiT only when "
                        f"every block's copy is the same (blocks {differ[:5]} differ)")
      value = copies[0]
    else:
      value = take(name)
    if value is None:
      continue
    if path == ("patch_embed", "kernel"):
      value = _patch_to_ours(value) if value.ndim == 4 else value
    elif path[-1] == "kernel":
      value = value.T
    if tuple(value.shape) != tuple(shape.shape):
      problems.append(f"{name}: shape {tuple(value.shape)} does not fit ours {tuple(shape.shape)}")
    out[path] = value
  if not conditional:  # the one label row of an unconditional diffusers DiT, folded in
    table = [take((_EMB + "class_embedder.embedding_table.weight").format(i=i))
             for i in range(depth)]
    if all(t is not None for t in table):
      if any(not np.array_equal(t, table[0]) for t in table) or table[0].shape[0] != 1:
        problems.append("class_embedder.embedding_table: an unconditional model's table must be "
                        "one row, the same in every block")
      elif ("t_fc2", "bias") in out and np.any(table[0]):
        out[("t_fc2", "bias")] = out[("t_fc2", "bias")] + table[0][0]
  unexpected = sorted(set(state_dict) - used)
  problems += [f"{k}: unexpected" for k in unexpected]
  if problems:
    raise diffusers_layout.LayoutError(diffusers_layout.problems_text(
        f"The {CLASS_NAME} weights do not fit the network", problems))
  return diffusers_layout.unflatten_tree(out)
