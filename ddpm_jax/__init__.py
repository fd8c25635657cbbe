"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax.

Importing the package (or any module of it) changes nothing in the process: no environment
variable, XLA flag or signal handler. The entry points (`ddpm_jax.main`, `ddpm_jax.pack_folder`,
the benchmarks and the tests' conftest) call `ddpm_jax.runtime.process_env.set_defaults()` first.
"""
