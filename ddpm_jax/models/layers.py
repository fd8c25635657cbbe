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
from jax import lax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import ops

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


class Conv(nn.Module):
  """`nn.Conv` with bias and 'SAME' padding (TF's, as in DDPM), same params ('kernel' HWIO,
  'bias'), whose bias gradient is a dot (`ops.bias_add`).

  Attributes:
    features: Output channels.
    kernel_size: Square kernel size.
    strides: Square stride.
    dtype: Compute dtype; params are float32.
    kernel_init: Initialiser of the kernel.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                 (self.strides, self.strides), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return ops.bias_add(y, bias)


class Dense(nn.Module):
  """`nn.Dense` (params 'kernel' [in, out], 'bias') whose bias gradient is a dot.

  Attributes:
    features: Output size.
    dtype: Compute dtype; params are float32.
    kernel_init: Initialiser of the kernel.
  """

  features: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                        (((x.ndim - 1,), (0,)), ((), ())))
    return ops.bias_add(y, bias)


def _conv(features: int, name: str, dtype: jnp.dtype, kernel: int = 3, strides: int = 1,
          kernel_init=default_init) -> Conv:
  """A square conv with bias, float32 params and 'SAME' padding (TF's, as in DDPM)."""
  return Conv(features, kernel, strides, dtype, kernel_init, name=name)


# Threefry-2x32's rotation schedule (Salmon et al. 2011, as in jax.random).
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_bernoulli(key_data: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)` for a threefry2x32 key, bit for bit, in one fusion.

  JAX's partitionable threefry hashes the pair (0, i) for flat index i and xors the two output
  words; a uniform is built from the top 23 bits, u = bitcast(bits >> 9 | 1.0f) - 1, and the
  sample is u < p. On XLA:CPU jax.random lowers the 20 rounds to a rolled loop that streams
  the whole array through memory five times; written out here they fuse into the consumer
  (docs/performance.md has the measurement).

  Args:
    key_data: uint32 [2], the key's data.
    p: probability of True.
    shape: output shape, with fewer than 2^32 elements.

  Returns:
    bool array of `shape`.
  """
  k0, k1 = key_data[0], key_data[1]
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0 = jnp.broadcast_to(ks[0], shape)
  x1 = lax.iota(np.uint32, math.prod(shape)).reshape(shape) + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ (lax.shift_left(x1, np.uint32(r)) | lax.shift_right_logical(x1, np.uint32(32 - r)))
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  bits = lax.shift_right_logical(x0 ^ x1, np.uint32(9)) | np.uint32(0x3F800000)
  return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1.0) < jnp.float32(p)


def _threefry_data(key: jax.Array) -> jax.Array | None:
  """The uint32 [2] data of a threefry key (typed or raw) under JAX's partitionable bits."""
  if not jax.config.jax_threefry_partitionable:
    return None
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key) if str(jax.random.key_impl(key)) == "threefry2x32" else None
  if key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
    return key
  return None


class Dropout(nn.Dropout):
  """`nn.Dropout` with the same masks, drawn by `threefry_bernoulli`.

  Same class name, so the same auto-name ("Dropout_0"), rng stream and masks: a drop-in
  replacement whose results are bitwise those of `nn.Dropout`. Keys of another implementation,
  broadcast dims or an explicit rng fall back to `nn.Dropout`'s own sampling.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    if self.broadcast_dims or rng is not None or not 0.0 < self.rate < 1.0:
      return super().__call__(inputs, deterministic, rng)
    if nn.merge_param("deterministic", self.deterministic, deterministic):
      return inputs
    key = self.make_rng(self.rng_collection)
    keep_prob = 1.0 - self.rate
    data = _threefry_data(key)
    if data is not None and inputs.size < 2**32:
      mask = threefry_bernoulli(data, keep_prob, inputs.shape)
    else:
      mask = jax.random.bernoulli(key, p=keep_prob, shape=inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


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
    h += Dense(self.out_ch, self.dtype, name="temb_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.swish(GroupNorm32(self.num_groups, self.dtype, name="norm2")(h))
    h = Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, "conv2", self.dtype, kernel_init=near_zero_init)(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, "shortcut", self.dtype, kernel=1)(x)
    return x + h


def attention_implementation(dtype, head_dim: int, backend: str | None = None) -> str:
  """Which kernel `attention` runs: "cudnn" (cuDNN's fused flash attention) on an NVIDIA GPU for
  float16/bfloat16 heads of a width cuDNN takes (a multiple of 8, at most 128), else "xla"
  (XLA's einsum-softmax-einsum; the only one on a TPU and a CPU)."""
  backend = backend or jax.default_backend()
  fused = (backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)
           and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fused else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v over [B, T, heads, D] arrays, by `jax.nn.dot_product_attention`
  with the kernel `attention_implementation` picks; the logits and the softmax are float32 in
  both."""
  impl = attention_implementation(q.dtype, q.shape[-1])
  return jax.nn.dot_product_attention(q, k, v, implementation=None if impl == "xla" else impl)


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
      return Dense(c, self.dtype, init, name=name)

    # One head of width C over the N = H*W positions ([B, N, heads=1, C]).
    q, k, v = (dense(name)(h).reshape(b, hgt * wid, 1, c) for name in ("q", "k", "v"))
    h = attention(q, k, v).reshape(b, hgt, wid, c)
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
