"""DDPM on CIFAR-10 (Ho et al. 2020): the published 35.7M-parameter model and training setup.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
"""

from configs import base


def get_config():
  return base.get_config()  # base *is* the published CIFAR-10 setting
