"""The networks, as Flax modules with typed fields (no config): the DDPM U-Net, the DiT and the
noise-conditional classifier of classifier guidance. `config.factories.create_model` builds them
from an experiment config (`model.name`: one of `BACKBONES`)."""

from ddpm_jax.models.dit import DIT_SIZES
from ddpm_jax.models.dit import DiT
from ddpm_jax.models.dit import TinyDiT
from ddpm_jax.models.noisy_classifier import NoisyClassifier
from ddpm_jax.models.unet import DTYPES
from ddpm_jax.models.unet import TinyUNet
from ddpm_jax.models.unet import UNet
from ddpm_jax.models.unet import group_norm_channels
from ddpm_jax.models.unet import param_count
from ddpm_jax.models.unet import param_shapes

# The noise predictors that config.model.name may name.
BACKBONES = ("unet", "dit")

__all__ = [
    "BACKBONES",
    "DIT_SIZES",
    "DTYPES",
    "DiT",
    "NoisyClassifier",
    "TinyDiT",
    "TinyUNet",
    "UNet",
    "group_norm_channels",
    "param_count",
    "param_shapes",
]
