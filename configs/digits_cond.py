"""Class-conditional digits: the quickstart's model and budget plus a class embedding.

Labels are dropped to the null class with probability training.p_uncond = 0.1, so the one
model serves conditional, unconditional and classifier-free guided sampling (Ho & Salimans
2022, who found p_uncond 0.1-0.2 best):

  python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond
  python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=runs/digits_cond \\
      --mode=sample --config.sampling.class_label=3 --config.sampling.guidance_scale=1
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.num_classes = 10
  config.training.p_uncond = 0.1
  # The unconditional score (FD, IS-like) runs as in the quickstart; the guidance sweep
  # (experiments/sweeps/digits_guidance.py) measures class agreement.
  config.sampling.class_label = -1
  return config
