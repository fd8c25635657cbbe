"""CelebA at 64x64 (centre crop 140, resize 64), the setting of DDIM / score_sde.

  python -m ddpm_jax.main --config=configs/celeba64.py --workdir=runs/celeba64
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.update(dataset="celeb_a", image_size=64, num_channels=3, random_flip=True)
  config.model.update(ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,))
  return config
