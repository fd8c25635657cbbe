"""The maths of diffusion, pure functions on arrays: schedules (beta and the tables derived from
them), noise_levels (sigma at fractional t, (alpha, s), and the one eps / x0 / v conversion
used everywhere), diffusion (q(x_t | x_0), the posterior, the conversions at integer t) and losses
(the training objectives and the VLB). No config, no Flax modules; imports nothing of ddpm_jax.
"""
