"""DDPM on MNIST at its native 28x28, with a U-Net of ch_mult (1, 2, 2).

  python -m ddpm_jax.main --config=configs/mnist.py --workdir=runs/mnist
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.update(dataset="mnist", image_size=28, num_channels=1, random_flip=False)
  config.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,))
  config.training.update(num_train_steps=100_000, ema_decay=0.9995)
  return config
