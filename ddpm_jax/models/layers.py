"""Building blocks of the DDPM U-Net (Ho et al. 2020, appendix B).

Every layer keeps its parameters in float32 and computes in `dtype` (the
compute dtype, e.g. bfloat16). The numerically delicate parts (GroupNorm
statistics and the attention softmax) always run in float32, because bfloat16's
8-bit mantissa loses too much there and is a known source of NaNs in reduced
precision training.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# DDPM's TF code initialises every conv/dense with variance_scaling(1, fan_avg, uniform).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# Layers that end a residual branch (and the output conv) start at about zero, so each
# block is close to the identity at initialisation (DDPM's init_scale=1e-10).
near_zero_init = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM).

  emb[b, i] = sin(t_b * w_i) and emb[b, half + i] = cos(t_b * w_i), where
  w_i = 10000^(-i / (half - 1)) and half = dim // 2.

  Args:
    t: Timesteps, shape [B], any integer or float dtype.
    dim: Embedding size; must be even and at least 4.

  Returns:
    float32 array of shape [B, dim].
  """
  if dim % 2 or dim < 4:
    raise ValueError(f"timestep embedding size must be even and >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class GroupNorm32(nn.Module):
  """GroupNorm computed in float32 whose output is cast to the compute dtype.

  Attributes:
    num_groups: Number of channel groups (32 in DDPM).
    dtype: Dtype of the output.
  """

  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Casting the input (not only the reductions) keeps x - mean exact in float32.
    y = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6, dtype=jnp.float32,
                     param_dtype=jnp.float32, name="norm")(x.astype(jnp.float32))
    return y.astype(self.dtype)


def _conv(features: int, name: str, dtype: jnp.dtype, kernel: int = 3, strides: int = 1,
          kernel_init=default_init) -> nn.Conv:
  """A square conv with bias, float32 params and 'SAME' padding (TF's, as in DDPM)."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name)


class ResnetBlock(nn.Module):
  """DDPM residual block with a timestep-embedding bias.

  h = conv1(swish(GN(x))) + Dense(swish(temb))[:, None, None, :]
  h = conv2(dropout(swish(GN(h))))
  out = shortcut(x) + h, where shortcut is a 1x1 conv only when channels change.

  Attributes:
    out_ch: Output channels.
    dropout: Dropout rate applied before the second conv.
    num_groups: GroupNorm groups.
    dtype: Compute dtype.
  """

  out_ch: int
  dropout: float
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.swish(GroupNorm32(self.num_groups, self.dtype, name="norm1")(x))
    h = _conv(self.out_ch, "conv1", self.dtype)(h)
    h += nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=default_init, name="temb_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.swish(GroupNorm32(self.num_groups, self.dtype, name="norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, "conv2", self.dtype, kernel_init=near_zero_init)(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, "shortcut", self.dtype, kernel=1)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual connection (DDPM).

  With q, k, v = 1x1 projections of GN(x) over the N = H*W positions:
  out = x + proj(softmax(q k^T / sqrt(C)) v).

  Attributes:
    num_groups: GroupNorm groups.
    dtype: Compute dtype; the softmax is always float32.
  """

  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = GroupNorm32(self.num_groups, self.dtype, name="norm")(x)

    def dense(name, init=default_init):
      # A Dense on NHWC is the same map as DDPM's 1x1 conv (NIN) and has the same params.
      return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init, name=name)

    q = dense("q")(h).reshape(b, hgt * wid, c)
    k = dense("k")(h).reshape(b, hgt * wid, c)
    v = dense("v")(h).reshape(b, hgt * wid, c)
    logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(self.dtype)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hgt, wid, c)
    return x + dense("proj_out", near_zero_init)(h)


class Downsample(nn.Module):
  """Halves the spatial size: strided 3x3 conv, or 2x2 average pooling.

  Attributes:
    with_conv: Use a learned stride-2 conv (DDPM default) instead of avg-pool.
    dtype: Compute dtype.
  """

  with_conv: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return _conv(x.shape[-1], "conv", self.dtype, strides=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles the spatial size: nearest-neighbour repeat, then an optional 3x3 conv.

  Attributes:
    with_conv: Follow the repeat with a 3x3 conv (DDPM default).
    dtype: Compute dtype.
  """

  with_conv: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Repeating each pixel 2x2 is exactly nearest-neighbour upsampling, with no gather.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv(x.shape[-1], "conv", self.dtype)(x)
    return x
