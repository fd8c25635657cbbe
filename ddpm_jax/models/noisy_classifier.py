"""A noise-conditional classifier p(c | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

As in ADM's classifier, it is the U-Net's downsampling half (same blocks and timestep embedding)
followed by the middle block and a pooled head:
  logits = Dense(K)(mean_{h,w} swish(GN(mid(down(x_t, temb(t)))))).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers


class NoisyClassifier(nn.Module):
  """Encoder half of the DDPM U-Net with a global-average-pooled linear head.

  Attributes:
    num_classes: K, the number of logits.
    ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, num_groups,
      dtype: as in `UNet`.
  """

  num_classes: int
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float = 0.0
  resamp_with_conv: bool = True
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
    """Logits [B, K] (float32) of noisy images x [B, H, W, C] at (float) timesteps t [B]."""
    t = jnp.broadcast_to(t, (x.shape[0],))
    res_block = functools.partial(layers.ResnetBlock, dropout=self.dropout,
                                  num_groups=self.num_groups, dtype=self.dtype)
    dense = functools.partial(layers.Dense, dtype=self.dtype)
    temb = layers.timestep_embedding(t, self.ch)
    temb = dense(4 * self.ch, name="temb_dense0")(temb)
    temb = dense(4 * self.ch, name="temb_dense1")(nn.swish(temb))
    h = layers.Conv(self.ch, dtype=self.dtype, name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(self.ch * mult, name=f"down_{level}_res_{i}")(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = layers.AttnBlock(self.num_groups, self.dtype, name=f"down_{level}_attn_{i}")(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(self.resamp_with_conv, self.dtype, name=f"down_{level}_downsample")(h)
    h = res_block(h.shape[-1], name="mid_res_0")(h, temb, train)
    h = nn.swish(layers.GroupNorm32(self.num_groups, jnp.float32, name="norm_out")(h))
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, param_dtype=jnp.float32, name="head")(h)


def log_prob_fn(module: NoisyClassifier, params):
  """`f(x_t, t) -> log p(. | x_t, t)` [B, K], the input `guidance.classifier_guidance` takes."""
  return lambda x, t: jax.nn.log_softmax(module.apply({"params": params}, x, t, train=False))
