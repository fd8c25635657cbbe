"""The PyTorch diffusers reference of the interop tests and benchmarks: the same networks, random.

`diffusers_unet` builds diffusers' `UNet2DModel` as DDPM's U-Net independently of
`ddpm_jax.interop` (written from diffusers' documentation, not from our exporter), so that a test
comparing the two compares two implementations. `ddim_difference` runs 10 DDIM steps in both.
Needs the `[test]` extra (torch, diffusers).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import digits
from ddpm_jax import sampling
from ddpm_jax.config import factories
from ddpm_jax.core import schedules
from ddpm_jax.interop import diffusers_layout
from ddpm_jax.interop import diffusers_scheduler
from ddpm_jax.models import unet as unet_lib

# Every schedule and prediction for DDIM (jsd ends at abar_T = 0, where an eps model cannot give
# x0).
DDIM_CASES = [(s, o) for s in schedules.SCHEDULES for o in ("eps", "v") if (s, o) != ("jsd", "eps")]


def diffusers_unet(config):
  """diffusers' UNet2DModel laid out as `ddpm_jax.models.UNet` for this config.

  DDPM's layout in diffusers' vocabulary (google/ddpm-cifar10-32 uses the same settings):
  sinusoidal embedding [sin, cos] with frequencies 10000^(-i / (half - 1)) (freq_shift=1, no
  flip), GroupNorm eps 1e-6, one attention head over all channels, TF 'SAME' strided convs
  (downsample_padding=0 pads right/bottom as TF does).
  """
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top

  m, d = config.model, config.data
  attn_at = [d.image_size // 2**level in m.attn_resolutions for level in range(len(m.ch_mult))]
  down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn_at)
  up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_at))
  return UNet2DModel(
      sample_size=d.image_size, in_channels=d.num_channels, out_channels=d.num_channels,
      block_out_channels=tuple(m.ch * k for k in m.ch_mult), layers_per_block=m.num_res_blocks,
      down_block_types=down, up_block_types=up, dropout=m.dropout, norm_num_groups=m.num_groups,
      norm_eps=1e-6, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0, act_fn="silu", time_embedding_type="positional")


def randomise(unet, seed: int = 0):
  """Every parameter of a torch module random, in place (GroupNorm scales near 1, the
  zero-initialised output conv included): a network whose every weight matters for parity."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))
  return unet.eval()


@functools.cache
def _digits_networks():
  """(diffusers' random digits U-Net, our jitted model_fn with its weights): the schedule and the
  prediction type do not change the network, so every DDIM case shares one."""
  config = digits.get_config()
  unet = randomise(diffusers_unet(config), seed=2)
  model = factories.create_model(config)
  d = config.data
  shapes = unet_lib.param_shapes(model, d.image_size, d.num_channels)
  params = diffusers_layout.params_from_state_dict(
      {k: v.numpy() for k, v in unet.state_dict().items()}, shapes, len(config.model.ch_mult))
  return unet, jax.jit(lambda x_, t_: model.apply({"params": params}, x_, t_, train=False))


def ddim_difference(schedule: str, output: str, shared_network: bool) -> float:
  """Largest |ours - theirs| after 10 DDIM steps; `shared_network`: diffusers' scheduler is
  driven by our network's outputs (its arithmetic alone), else each side runs its own network."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  config = digits.get_config()
  config.diffusion.update(schedule=schedule, model_output=output)
  unet, model_fn = _digits_networks()
  cfg = diffusers_scheduler.scheduler_config(config.diffusion.to_dict())
  ddim = diffusers.DDIMScheduler.from_config({**cfg, "_class_name": "DDIMScheduler"})
  tables = factories.tables_from_config(config)
  if shared_network:  # the update rules alone: both on our abar (rounded once to float32)
    ddim.alphas_cumprod = torch.from_numpy(np.asarray(tables.abar, np.float32))
  ddim.set_timesteps(10)
  x_t = np.random.default_rng(1).standard_normal((4, 8, 8, 1)).astype(np.float32)
  x = torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    for t in ddim.timesteps:
      if shared_network:
        out = np.asarray(model_fn(x.numpy().transpose(0, 2, 3, 1), jnp.full((4,), float(t))))
        out = torch.from_numpy(out.transpose(0, 3, 1, 2).copy())
      else:
        out = unet(x, t).sample
      x = ddim.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
  sampler = sampling.get_sampler("ddim", tables, model_output=output, num_steps=10,
                                 grid="trailing")
  ours, _ = sampler(model_fn, jax.random.key(0), x_t.shape, x_start=x_t, t_start=999)
  return float(np.abs(np.asarray(ours) - x.numpy().transpose(0, 2, 3, 1)).max())
