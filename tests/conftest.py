"""Test-wide JAX setup: the entry points' process defaults, 4 simulated CPU devices and fast
compiles.

This must run before anything imports jax, which pytest guarantees for conftest.py.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ddpm_jax.runtime import process_env  # noqa: E402  (imports nothing heavy)

process_env.set_defaults()  # as `python -m ddpm_jax.main` does: the same XLA kernels

import jax  # noqa: E402

# Tests check maths and plumbing, not XLA's optimiser; this roughly halves compile time.
jax.config.update("jax_disable_most_optimizations", True)
