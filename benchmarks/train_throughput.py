"""Train-step throughput of any config: images/s, achieved FLOP/s, MFU, compile time, memory.

  python benchmarks/train_throughput.py --config=configs/cifar10.py --batch=8 --steps=5
  python benchmarks/train_throughput.py --config=configs/digits.py --batch=128 --steps=50
  python benchmarks/train_throughput.py --config=configs/cifar10.py --batch=128 \
      --config.model.dtype=bfloat16      # on a TPU or GPU

FLOPs per device come from XLA's cost analysis of the compiled step. MFU is those FLOP/s over
the device's published dense peak for the compute dtype (`benchmarks/perf.py`'s `PEAK_TFLOPS`:
bf16 for bfloat16; for float32 on GPUs the TF32 tensor-core peak, which XLA's default matmul
precision uses). A CPU has no published peak: there the reference is this machine's measured
matmul rate in the compute dtype (a 2048^3 jnp.dot), the best dense throughput XLA reaches here.
Peak memory is the process's max RSS on CPU (it includes the Python runtime), the allocator's peak
elsewhere.
"""

import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from benchmarks import perf
from ddpm_jax import models
from ddpm_jax.config import validation
from ddpm_jax.runtime import process_env
from ddpm_jax.runtime import train_state as train_state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")


def peak_memory_gib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(_):
  config = _CONFIG.value
  with config.unlocked():
    config.training.batch_size = _BATCH.value
  validation.validate(config, mode="sample")
  setup = perf.train_setup(config, _BATCH.value)
  state, batch = setup.state, setup.batch

  start = time.perf_counter()
  compiled = setup.step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_step = float(cost.get("flops", float("nan")))

  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value

  achieved = flops_per_step / seconds / 1e9
  kind = jax.devices()[0].device_kind
  published = perf.peak_tflops(kind, config.model.dtype)
  if published is not None:
    peak, peak_name = published * 1e3, f"published {config.model.dtype} dense peak of a {kind}"
  else:
    peak = perf.matmul_gflops(models.DTYPES[config.model.dtype])
    peak_name = f"measured 2048^3 {config.model.dtype} jnp.dot on this {kind}"
  params = train_state_lib.param_count(state.params)
  print(f"config            {sys.argv[1] if len(sys.argv) > 1 else ''}")
  print(f"devices           {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"params            {params:,}")
  print(f"global batch      {_BATCH.value}")
  print(f"step time         {seconds * 1e3:.1f} ms")
  print(f"images/s          {_BATCH.value / seconds:.1f}")
  print(f"compute dtype     {config.model.dtype}")
  print(f"GFLOP/step        {flops_per_step / 1e9:.2f} per device (XLA cost analysis)")
  print(f"achieved GFLOP/s  {achieved:.1f} per device")
  print(f"peak GFLOP/s      {peak:.1f} ({peak_name})")
  print(f"MFU               {achieved / peak:.1%}")
  print(f"compile time      {compile_s:.1f} s")
  print(f"peak memory       {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
  process_env.set_defaults()  # an entry point: before jax starts a backend
  app.run(main)
