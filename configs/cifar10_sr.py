"""A CIFAR-10 super-resolution stage, 16x16 -> 32x32 (SR3, Saharia et al. 2021; the second stage
of a cascade, Ho et al. 2022), for accelerators.

The DDPM CIFAR-10 U-Net that also takes the 2x2-average-pooled image, with Gaussian conditioning
augmentation of std U[0, 0.2] while training and 0.05 when sampling (Ho et al. 2022 find a
little noise on the low-resolution input at sampling best), bilinearly upsampled to 32x32. The
base stage is e.g. configs/cifar10.py at data.image_size=16:

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar16 \
      --config.data.image_size=16 --config.model.attn_resolutions='(8,)'
  python -m ddpm_jax.main --config=configs/cifar10_sr.py --workdir=runs/cifar10_sr
  python -m ddpm_jax.main --config=configs/cifar10_sr.py --workdir=runs/cifar10_sr \
      --mode=cascade --config.cascade.base_workdir=runs/cifar16
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.update(sr_factor=2)
  config.training.update(cond_aug_max=0.2)
  config.sampling.update(cond_aug=0.05, sampler="dpm_solver_pp", num_steps=50)
  config.eval.update(metrics=("fid",))
  return config
