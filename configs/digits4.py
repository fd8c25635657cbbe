"""The base stage of the digits cascade: the 8x8 digits resized to 4x4 (antialiased bicubic).

  python -m ddpm_jax.main --config=configs/digits4.py --workdir=runs/digits4
  python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=runs/digits_sr
  python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=runs/digits_sr --mode=cascade \
      --config.cascade.base_workdir=runs/digits4

A 4x4 digit is a blur, so the base is scored by bits/dim only (the digits classifier reads 8x8
images: score the cascade's output instead).
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.data.update(image_size=4)
  # One level: 4x4 has no room to downsample.
  config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
  config.training.update(num_train_steps=1_500, final_eval_metrics=("bpd",))
  config.eval.update(metrics=("bpd",))
  return config
