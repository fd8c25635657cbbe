"""Denoising networks: the DDPM U-Net and the factory that builds it from a config."""

from ddpm_jax.models.unet import DTYPES
from ddpm_jax.models.unet import LEARNED_VARIANCES
from ddpm_jax.models.unet import TinyUNet
from ddpm_jax.models.unet import UNet
from ddpm_jax.models.unet import create_model
from ddpm_jax.models.unet import param_count
from ddpm_jax.models.unet import param_shapes

__all__ = [
    "DTYPES",
    "LEARNED_VARIANCES",
    "TinyUNet",
    "UNet",
    "create_model",
    "param_count",
    "param_shapes",
]
