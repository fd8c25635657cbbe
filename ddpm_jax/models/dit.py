"""The Diffusion Transformer (DiT, Peebles & Xie 2023), in pixel space.

    tokens = Linear(patchify_p(x)) + pos          (T = (H/p)(W/p) tokens of width d)
    c = MLP(freq_256(t)) + Embed(y)               (the time and class conditioning)
    each of `depth` adaLN-Zero blocks, with (shift1, scale1, gate1, shift2, scale2, gate2)
      = Linear_zero(SiLU(c)) and mod(h, shift, scale) = h (1 + scale) + shift:
        x += gate1 * Attn(mod(LN(x), shift1, scale1))
        x += gate2 * MLP(mod(LN(x), shift2, scale2))
    out = unpatchify(Linear_zero(mod(LN(x), shift, scale))), (shift, scale) = Linear_zero(SiLU(c))

LayerNorms have no affine parameters; the MLP is d -> 4d -> d with tanh-GELU; `pos` is the fixed
2-D sin-cos embedding of MAE (He et al. 2022). The adaLN and output Linears start at zero, so at
initialisation every block is the identity and the output is 0.

The conventions follow diffusers' `DiTTransformer2DModel` (the reference the importer is tested
against), which differs from the DiT paper's code in two small places: the 256 time frequencies
are 10000^(-i / (half - 1)) (diffusers' `downscale_freq_shift=1`), and the LayerNorm before the
MLP has epsilon `norm_eps` (diffusers' default 1e-5; the paper's 1e-6).

Attention is `jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU where it applies, XLA
elsewhere. Like the U-Net, the module takes typed fields only (`config.factories.create_model`
reads the config) and computes in `dtype` with float32 params, LayerNorms and softmax.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import layers

# The sizes of Peebles & Xie 2023, Table 1: (depth, hidden_size, num_heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# The time embedding's number of sinusoidal frequencies (DiT's frequency_embedding_size).
FREQ_DIM = 256

xavier_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(0.02)
zeros_init = nn.initializers.zeros


def frequency_embedding(t: jax.Array, dim: int = FREQ_DIM) -> jax.Array:
  """[cos(t w_i), sin(t w_i)] with w_i = 10000^(-i / (half - 1)), i < half = dim / 2 (diffusers'
  `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1)`). float32 [B, dim]."""
  half = dim // 2
  # The frequencies are constants: the float32 exponent (-ln(10000) i) / (half - 1), computed in
  # diffusers' order, then exp in float64, rounded once. A backend's float32 exp may be one ulp
  # off, which moves sin(t w) by up to t w 2^-23: 1e-4 at t = 999, large next to float32 noise.
  exponent = np.float32(-math.log(10_000.0)) * np.arange(half, dtype=np.float32)
  freqs = np.exp((exponent / np.float32(half - 1)).astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE's 1-D embedding: [sin(pos w), cos(pos w)], w_i = 10000^(-2i / dim), in float64."""
  omega = 1.0 / 10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = pos.reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding [grid_h * grid_w, dim] (MAE; DiT), tokens in
  row-major order: the first half of the channels embeds the column, the second the row."""
  if dim % 4:
    raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing="ij")
  return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], tokens row-major, each patch in (row, col, channel)
  order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """The inverse of `patchify`: [B, (h/p)(w/p), p*p*C] -> [B, h, w, C]."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis without affine params, in float32: y = (x - mean) r with
  r = 1 / sqrt(var + eps)."""
  return _normalize(x.astype(jnp.float32), eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: jax.Array, eps: float) -> jax.Array:
  return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
  centred = x - x.mean(-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
  y = centred * r
  return y, (y, r)


def _normalize_bwd(eps, res, g):
  """dx = r (g - mean(g) - y mean(g y)), the closed form of the LayerNorm's VJP. XLA:CPU compiles
  the autodiff of the forward into a backward pass 5x slower than this (a digits DiT's train step
  went from 385 ms to 148 ms, docs/dit.md)."""
  del eps
  y, r = res
  return (r * (g - g.mean(-1, keepdims=True) - y * (g * y).mean(-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _modulate(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head self-attention over tokens [B, T, d], through `jax.nn.dot_product_attention`.

  Attributes:
    num_heads: Heads; d must be divisible by them.
    dtype: Compute dtype.
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    dense = functools.partial(layers.Dense, d, self.dtype, xavier_init)
    shape = (b, n, self.num_heads, d // self.num_heads)
    q, k, v = (dense(name=name)(x).reshape(shape) for name in ("q", "k", "v"))
    h = layers.attention(q, k, v).reshape(b, n, d)
    return dense(name="proj")(h)


class DiTBlock(nn.Module):
  """An adaLN-Zero transformer block (DiT, Fig. 3).

  Attributes:
    num_heads: Attention heads.
    mlp_ratio: The MLP's hidden width over d.
    norm_eps: Epsilon of the LayerNorm before the MLP (the one before attention has 1e-6).
    dtype: Compute dtype.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x: the float32 residual stream [B, T, d]; c: the conditioning [B, d]."""
    d = x.shape[-1]
    mod = layers.Dense(6 * d, self.dtype, zeros_init, name="adaLN")(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod.astype(jnp.float32), 6, axis=-1)
    h = _modulate(_layer_norm(x, 1e-6), shift1, scale1).astype(self.dtype)
    x = x + gate1[:, None, :] * Attention(self.num_heads, self.dtype, name="attn")(h)
    h = _modulate(_layer_norm(x, self.norm_eps), shift2, scale2).astype(self.dtype)
    h = layers.Dense(int(d * self.mlp_ratio), self.dtype, xavier_init, name="mlp_fc1")(h)
    h = layers.Dense(d, self.dtype, xavier_init, name="mlp_fc2")(nn.gelu(h, approximate=True))
    return x + gate2[:, None, :] * h


class DiT(nn.Module):
  """The DiT noise predictor on NHWC images, with the U-Net's call signature.

  Attributes:
    patch_size: p; the image's height and width must be multiples of it.
    hidden_size: d, the token width; divisible by num_heads and by 4.
    depth: Number of blocks.
    num_heads: Attention heads.
    out_channels: Output channels (2x the image channels for a learned variance).
    mlp_ratio: The MLP's hidden width over d.
    num_classes: 0 for an unconditional model (no class table); K > 0 adds a table of K + 1 rows,
      the last (index K) being the null class of classifier-free guidance.
    norm_eps: Epsilon of each block's LayerNorm before the MLP.
    dtype: Compute dtype. Params, LayerNorms, softmax and the output stay float32.
  """

  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  out_channels: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool, cond: jax.Array | None = None,
               cond_level: jax.Array | None = None) -> jax.Array:
    """Predicts the model output for noisy images x [B, H, W, C] at times t [B] (or a scalar);
    y as the U-Net's. `train` is accepted for the common signature (DiT has no dropout); `cond`
    and `cond_level` (super-resolution) are the U-Net's only. float32 [B, H, W, out_channels]."""
    del train
    p, d = self.patch_size, self.hidden_size
    if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"expected NHWC input with H, W divisible by the patch size {p}, got "
                       f"{x.shape}")
    if cond is not None or cond_level is not None:
      raise ValueError("the DiT is not a super-resolution stage: it takes no low-resolution input")
    if d % self.num_heads:
      raise ValueError(f"hidden_size {d} must be divisible by num_heads {self.num_heads}")
    b, hgt, wid, _ = x.shape
    t = jnp.broadcast_to(t, (b,))

    c = layers.Dense(d, jnp.float32, embed_init, name="t_fc1")(frequency_embedding(t))
    c = layers.Dense(d, jnp.float32, embed_init, name="t_fc2")(nn.silu(c))
    if self.num_classes > 0:
      y = jnp.full((b,), self.num_classes, jnp.int32) if y is None else y
      y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))
      c = c + nn.Embed(self.num_classes + 1, d, embedding_init=embed_init,
                       param_dtype=jnp.float32, name="class_emb")(y)
    elif y is not None:
      raise ValueError("class labels given to an unconditional DiT (model.num_classes = 0)")

    pos = sincos_2d_pos_embed(d, hgt // p, wid // p).astype(np.float32)
    h = layers.Dense(d, self.dtype, xavier_init, name="patch_embed")(patchify(x, p))
    h = h.astype(jnp.float32) + pos[None]
    for i in range(self.depth):
      h = DiTBlock(self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype,
                   name=f"block_{i}")(h, c)

    shift, scale = jnp.split(layers.Dense(2 * d, jnp.float32, zeros_init, name="final_adaLN")(
        nn.silu(c)), 2, axis=-1)
    h = _modulate(_layer_norm(h, 1e-6), shift, scale)
    h = layers.Dense(p * p * self.out_channels, jnp.float32, zeros_init, name="final_proj")(h)
    return unpatchify(h, p, hgt, wid).astype(jnp.float32)


# A DiT of a few ten-thousand parameters for tests.
TinyDiT = functools.partial(DiT, patch_size=2, hidden_size=32, depth=2, num_heads=2)
