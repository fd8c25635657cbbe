"""The DDPM U-Net (Ho et al. 2020, appendix B).

The module takes typed fields only; `config.factories.create_model` is the one place that reads
the experiment ConfigDict and maps its names (dtype, model_var) onto those fields.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers

# Compute dtypes that config.model.dtype may name. Params are float32 in every case.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Variance parameterisations whose network also outputs a variance, so twice the channels.


class UNet(nn.Module):
  """DDPM's noise-prediction U-Net on NHWC images.

  Layout (L = len(ch_mult), level i has ch * ch_mult[i] channels and spatial
  size H / 2^i):
    temb = Dense(4ch)(swish(Dense(4ch)(sinusoidal(t, ch))))
    down: conv3x3 to ch; at each level num_res_blocks ResnetBlocks (each followed
      by attention when the current height is in attn_resolutions), then a
      Downsample except at the last level. Every block output (and the stem)
      is pushed on a skip stack.
    middle: ResnetBlock, AttnBlock, ResnetBlock.
    up: levels in reverse, each with num_res_blocks + 1 ResnetBlocks that take
      concat(h, skip.pop()) (plus attention as above), then an Upsample except
      at level 0.
    out: GroupNorm, swish, conv3x3 (initialised to about zero) to out_channels.

  Attributes:
    ch: Base channel count; also the size of the sinusoidal timestep embedding.
    ch_mult: Channel multiplier per resolution level.
    num_res_blocks: ResnetBlocks per level on the way down (+1 on the way up).
    attn_resolutions: Spatial sizes (heights) at which self-attention is applied.
    dropout: Dropout rate inside ResnetBlocks, used only when train=True.
    resamp_with_conv: Strided-conv downsampling and conv after upsampling, rather
      than avg-pool and plain nearest-neighbour repeat.
    out_channels: Output channels (2x the image channels for a learned variance).
    num_groups: GroupNorm groups; 32 as in DDPM. It must divide every channel count the
      GroupNorms see (`group_norm_channels`); tiny test models use fewer, so that each group
      holds several channels.
    dtype: Compute dtype. Params, GroupNorm, softmax and the output stay float32.
    num_classes: 0 for an unconditional model (no class parameters at all, so unconditional
      checkpoints keep loading); K > 0 adds a learned class embedding with K + 1 rows, the last
      (index K) being the null class of classifier-free guidance (Ho & Salimans 2022). As in
      Improved DDPM / ADM (Dhariwal & Nichol 2021) it is added to the timestep embedding:
      temb = MLP(sinusoidal(t)) + Embed(y).
    cond_channels: 0 for an unconditional model; C > 0 makes it a super-resolution stage
      (SR3, Saharia et al. 2021; cascaded diffusion, Ho et al. 2022): the input is
      concat(x_t, cond), cond being the bilinearly upsampled low-resolution image [B, H, W, C],
      and the conditioning-augmentation level of cond (the std of the Gaussian noise added to
      it) is embedded like t and added to temb: temb += Dense(sinusoidal(1000 level)).
  """

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  resamp_with_conv: bool
  out_channels: int
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  num_classes: int = 0
  cond_channels: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool, cond: jax.Array | None = None,
               cond_level: jax.Array | None = None) -> jax.Array:
    """Predicts the model output (e.g. eps) for noisy images at timesteps t.

    Args:
      x: Noisy images, [B, H, W, C]; H and W divisible by 2^(len(ch_mult) - 1).
      t: Timesteps, [B] (a scalar is broadcast over the batch); float indices are fine, the
        sinusoidal embedding is continuous.
      y: Class labels int [B] in [0, num_classes], num_classes being the null class; None
        means the null class. Must be None for an unconditional model.
      train: Enables dropout, which then needs the 'dropout' rng collection.
      cond, cond_level: a super-resolution stage's upsampled low-resolution image
        [B, H, W, cond_channels] and its augmentation level [B] (scalar broadcast; None = 0).
        Required when cond_channels > 0 (zeros while initialising), else must be None.

    Returns:
      float32 array of shape [B, H, W, out_channels].
    """
    num_levels = len(self.ch_mult)
    factor = 2 ** (num_levels - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"expected NHWC input with H, W divisible by {factor}, got {x.shape}")
    t = jnp.broadcast_to(t, (x.shape[0],))

    res_block = functools.partial(layers.ResnetBlock, dropout=self.dropout,
                                  num_groups=self.num_groups, dtype=self.dtype)
    attn_block = functools.partial(layers.AttnBlock, num_groups=self.num_groups, dtype=self.dtype)
    dense = functools.partial(layers.Dense, dtype=self.dtype)

    temb = layers.timestep_embedding(t, self.ch)
    temb = dense(4 * self.ch, name="temb_dense0")(temb)
    temb = dense(4 * self.ch, name="temb_dense1")(nn.swish(temb))
    if self.num_classes > 0:
      y = jnp.full((x.shape[0],), self.num_classes, jnp.int32) if y is None else y
      y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, param_dtype=jnp.float32,
                             name="class_emb")(y).astype(temb.dtype)
    elif y is not None:
      raise ValueError("class labels given to an unconditional U-Net (model.num_classes = 0)")
    if self.cond_channels > 0:
      if cond is None:
        if not self.is_initializing():
          raise ValueError("this super-resolution U-Net needs its low-resolution input (cond)")
        cond = jnp.zeros(x.shape[:3] + (self.cond_channels,), x.dtype)
      if cond.shape != x.shape[:3] + (self.cond_channels,):
        raise ValueError(f"cond must be {x.shape[:3] + (self.cond_channels,)}, got {cond.shape}")
      level = jnp.zeros((x.shape[0],)) if cond_level is None else cond_level
      level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (x.shape[0],))
      lemb = layers.timestep_embedding(1000.0 * level, self.ch)
      temb = temb + dense(4 * self.ch, name="cond_level_dense")(lemb).astype(temb.dtype)
      x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    elif cond is not None:
      raise ValueError("a low-resolution input given to a U-Net that is not a super-resolution "
                       "stage (model.sr_factor = 0)")

    # Downsampling path: every intermediate activation becomes a skip connection.
    hs = [layers.Conv(self.ch, dtype=self.dtype, name="conv_in")(x)]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(self.ch * mult, name=f"down_{level}_res_{i}")(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"down_{level}_attn_{i}")(h)
        hs.append(h)
      if level != num_levels - 1:
        hs.append(layers.Downsample(self.resamp_with_conv, self.dtype,
                                    name=f"down_{level}_downsample")(hs[-1]))

    h = hs[-1]
    mid_ch = h.shape[-1]
    h = res_block(mid_ch, name="mid_res_0")(h, temb, train)
    h = attn_block(name="mid_attn")(h)
    h = res_block(mid_ch, name="mid_res_1")(h, temb, train)

    # Upsampling path: one extra block per level so that every skip is consumed.
    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_block(self.ch * self.ch_mult[level], name=f"up_{level}_res_{i}")(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = layers.Upsample(self.resamp_with_conv, self.dtype, name=f"up_{level}_upsample")(h)
    assert not hs, "every skip connection must be consumed"

    # The head runs in float32: it is cheap (few output channels) and its error would
    # go straight into the predicted noise.
    h = nn.swish(layers.GroupNorm32(self.num_groups, jnp.float32, name="norm_out")(h))
    h = layers.Conv(self.out_channels, dtype=jnp.float32, kernel_init=layers.near_zero_init,
                    name="conv_out")(h)
    return h.astype(jnp.float32)


# A few-thousand-parameter U-Net for tests; 8 groups divide all of its channel counts
# (16, 32 and the concatenations 32, 48, 64). Pass out_channels when building it.
TinyUNet = functools.partial(UNet, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                             dropout=0.0, resamp_with_conv=True, num_groups=8)


def group_norm_channels(ch: int, ch_mult: tuple[int, ...],
                        num_res_blocks: int) -> tuple[int, ...]:
  """The channel counts the `UNet`'s GroupNorms normalise, sorted: each level's width ch * mult,
  the stem's ch where a block reads it, and on the way up each concatenation of the running
  activation with a skip (a sum of two widths). `num_groups` must divide all of them; the
  `NoisyClassifier` (the encoder half) normalises a subset."""
  skips, counts = [ch], set()
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      counts |= {skips[-1], ch * mult}  # norm1 reads the input, norm2 and attention the output
      skips.append(ch * mult)
    if level != len(ch_mult) - 1:
      skips.append(skips[-1])  # a Downsample keeps the channels
  h = skips[-1]
  counts.add(h)  # the middle block
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      counts |= {h + skips.pop(), ch * ch_mult[level]}
      h = ch * ch_mult[level]
  counts.add(h)  # norm_out
  return tuple(sorted(counts))


def param_shapes(module: nn.Module, image_size: int, channels: int) -> Any:
  """Shapes of the module's params (a pytree of ShapeDtypeStruct), without allocating them.

  Args:
    module: An unbound UNet.
    image_size: Height and width of the input images.
    channels: Channels of the input images.

  Returns:
    The 'params' collection as jax.ShapeDtypeStruct leaves.
  """
  def init():
    return module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                       jnp.zeros((1, image_size, image_size, channels), jnp.float32),
                       jnp.zeros((1,), jnp.int32), train=False)
  return jax.eval_shape(init)["params"]


def param_count(module: nn.Module, image_size: int, channels: int) -> int:
  """Number of parameters of the module, by tracing only (no compile, no allocation)."""
  return sum(leaf.size for leaf in jax.tree.leaves(param_shapes(module, image_size, channels)))
