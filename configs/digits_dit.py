"""The digits with a small DiT (Peebles & Xie 2023) instead of the U-Net: 2x2 patches (16 tokens
of an 8x8 image), 6 blocks of width 128 and 4 heads, otherwise the quickstart's process, sampler
and budget. docs/dit.md compares it with the U-Net.

  python -m ddpm_jax.main --config=configs/digits_dit.py --workdir=runs/digits_dit
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.update(name="dit", patch_size=2, hidden_size=128, depth=6, num_heads=4,
                      mlp_ratio=4.0, dropout=0.0)
  # Transformers want a smaller step than the U-Net's 1e-3 (DiT trains at 1e-4 with batch 256).
  config.optim.update(lr=3e-4, warmup_steps=200)
  return config
