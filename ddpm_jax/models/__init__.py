"""The networks, as Flax modules with typed fields (no config): the DDPM U-Net and the
noise-conditional classifier of classifier guidance. `config.factories.create_model` builds them
from an experiment config."""

from ddpm_jax.models.noisy_classifier import NoisyClassifier
from ddpm_jax.models.unet import DTYPES
from ddpm_jax.models.unet import TinyUNet
from ddpm_jax.models.unet import UNet
from ddpm_jax.models.unet import group_norm_channels
from ddpm_jax.models.unet import param_count
from ddpm_jax.models.unet import param_shapes

__all__ = [
    "DTYPES",
    "NoisyClassifier",
    "TinyUNet",
    "UNet",
    "group_norm_channels",
    "param_count",
    "param_shapes",
]
