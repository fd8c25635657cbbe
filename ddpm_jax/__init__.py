"""ddpm_jax: denoising diffusion probabilistic models in JAX/Flax."""

import os

# gcsfs >= 2025.x probes each bucket's layout over the Storage Control gRPC API before its first
# use (for zonal / hierarchical-namespace buckets). Where that API is not reachable (the GCS
# emulator, a VM without the gRPC endpoint) the probe stalls 60 s and then falls back to the plain
# JSON API anyway. We use only plain object operations, so skip the probe; set the variable to
# "true" to get gcsfs's hierarchical-namespace features back.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK by default. On our
# U-Nets its kernels lose to XLA's own: with them off the digits train step went from 154 to
# 99 ms at batch 128 and the CIFAR-10 one from 6.83 to 6.09 s at batch 32, in one process
# (README "Performance"). Results change by float rounding only. XLA reads the flag when JAX
# starts its CPU backend, so this must run before that; a user's own setting of it wins, and
# other backends ignore it.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=".strip()
