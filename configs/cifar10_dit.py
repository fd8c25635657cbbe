"""DiT-B/2 (Peebles & Xie 2023) on CIFAR-10 pixels: 2x2 patches (256 tokens), 12 blocks of width
768 with 12 heads, 130M parameters. DiT's training recipe: a learned variance (Improved DDPM's
learned range and hybrid loss) on the linear schedule, Adam at 1e-4 without warm-up, batch 256,
EMA 0.9999.

  python -m ddpm_jax.main --config=configs/cifar10_dit.py --workdir=runs/cifar10_dit
"""

from configs import base


def get_config():
  config = base.get_config()
  # DiT-B (ddpm_jax.models.DIT_SIZES["B"]): depth 12, width 768, 12 heads.
  config.model.update(name="dit", patch_size=2, hidden_size=768, depth=12, num_heads=12,
                      mlp_ratio=4.0, dropout=0.0)
  config.diffusion.update(model_var="learned_range", loss="hybrid")
  config.training.update(batch_size=256)
  config.optim.update(lr=1e-4, warmup_steps=0)
  return config
