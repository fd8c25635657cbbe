"""The maths of diffusion, pure functions on arrays: schedules (beta and the tables derived from
them), diffusion (q(x_t | x_0), the posterior, the eps / x0 / v conversions) and losses (the
training objectives and the VLB). No config, no Flax modules; imports nothing of ddpm_jax.
"""
