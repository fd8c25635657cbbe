"""The super-resolution stage of the digits cascade (SR3, Saharia et al. 2021): 4x4 -> 8x8.

The U-Net also sees the 2x2-average-pooled digit, with Gaussian conditioning augmentation of std
U[0, 0.2] (Ho et al. 2022), bilinearly upsampled to 8x8; it is sampled with augmentation 0.05.
Trains in the quickstart's budget on a 2-core CPU; the final score is the digits score of the
upsampled held-out test digits.

  python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=runs/digits_sr
  python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=runs/digits_sr --mode=sample \
      --config.sampling.low_res_input=low_res.npz       # [N, 4, 4, 1] images
  python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=runs/digits_sr --mode=cascade \
      --config.cascade.base_workdir=runs/digits4
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.update(sr_factor=2)
  config.training.update(cond_aug_max=0.2)
  config.sampling.update(cond_aug=0.05)
  config.eval.update(metrics=("digits_score",))
  return config
