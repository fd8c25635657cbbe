"""Class-conditional CIFAR-10 with classifier-free guidance.

There is no published class-conditional run of DDPM's exact U-Net, so this combines published
pieces, each unchanged:
  * the network, optimiser, schedule and 800k steps of DDPM on CIFAR-10 (Ho et al. 2020), i.e.
    configs/cifar10.py;
  * the class embedding added to the timestep embedding (Nichol & Dhariwal 2021; Dhariwal &
    Nichol 2021, "ADM"), with 10 classes plus the null class;
  * label dropout p_uncond = 0.1 (Ho & Salimans 2022 trained with 0.1 and 0.2) and the
    FID-optimal guidance w = 0.3 of their Table 1 (ImageNet 64x64) as the sampling default.

  python -m ddpm_jax.main --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond
  python -m ddpm_jax.main --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond \\
      --mode=sample --config.sampling.class_label=3
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10
  config.training.p_uncond = 0.1
  config.sampling.guidance_scale = 0.3
  return config
