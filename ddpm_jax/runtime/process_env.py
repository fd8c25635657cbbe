"""Process-wide defaults that only an entry point sets, before JAX starts a backend.

A library user who imports `ddpm_jax` keeps JAX's and gcsfs's own defaults; `ddpm_jax.main`,
`ddpm_jax.pack_folder`, the benchmarks and the tests call `set_defaults()` first. Every setting
here is a default: a value the user already put in the environment wins.
"""

import os

# XLA:CPU's flag that hands convolutions, dots, elementwise ops and reductions to YNNPACK.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def set_defaults() -> None:
  """Sets this project's process defaults, leaving any the user chose alone.

  * `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs >= 2025.x probes each bucket's layout over
    the Storage Control gRPC API before first use (for zonal / hierarchical-namespace buckets).
    Where that API is not reachable (the GCS emulator, a VM without the gRPC endpoint) the probe
    stalls 60 s and then falls back to the JSON API anyway. We use only plain object operations;
    set the variable to "true" to get gcsfs's hierarchical-namespace features back.
  * `XLA_FLAGS += --xla_cpu_experimental_ynn_fusion_type=`: XLA's own CPU kernels instead of
    YNNPACK's library fusions, which lose to them on our U-Nets (docs/performance.md). Results
    change by float rounding only; other backends ignore the flag. XLA reads it when JAX starts
    its CPU backend, so this must run before the first computation.
  """
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  if YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FLAG}=".strip()
