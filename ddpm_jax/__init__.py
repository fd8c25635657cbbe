"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax."""

import os

# gcsfs >= 2025.x probes each bucket's layout over the Storage Control gRPC API before its first
# use (for zonal / hierarchical-namespace buckets). Where that API is not reachable (the GCS
# emulator, a VM without the gRPC endpoint) the probe stalls 60 s and then falls back to the plain
# JSON API anyway. We use only plain object operations, so skip the probe; set the variable to
# "true" to get gcsfs's hierarchical-namespace features back.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
