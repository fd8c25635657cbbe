"""Published checkpoints in and out: diffusers UNet2DModel folders and DDPM's TF1 checkpoints."""
