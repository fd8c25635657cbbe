"""Sampler throughput: time per sampler step against one bare model forward pass, and images/s.

  python benchmarks/sampling_throughput.py --config=configs/cifar10.py --batch=8 --steps=4
  python benchmarks/sampling_throughput.py --config=configs/digits.py --batch=500 --steps=20

Each sampler runs its compiled loop for `--steps` model calls (ancestral on a T=`--steps`
schedule), so a CPU can time the CIFAR-10 model; images/s at the usual step counts (ancestral:
1000, DDIM: 50, DPM-Solver++: 20, overridable) is then batch / (per-step time x step count). The
overhead column is the sampler's per-step time over a bare jitted forward pass of the same batch.
Params are random (a trained model costs the same).
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from ddpm_jax import sampling
from ddpm_jax.config import validation
from ddpm_jax.core import schedules
from ddpm_jax.runtime import process_env
from ddpm_jax.runtime import train_state as train_state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 8, "Images per sampler call.")
_STEPS = flags.DEFINE_integer("steps", 4, "Model calls timed per sampler.")
_FULL = flags.DEFINE_list("full_steps", ["ancestral:1000", "ddim:50", "dpm_solver_pp:20"],
                          "Step counts that images/s is reported for.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs; the fastest counts.")
_SAMPLERS = flags.DEFINE_list("samplers", [], "Samplers to time (default: every one).")


def _best_time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(_):
  config = _CONFIG.value
  parts = validation.validate(config, mode="sample")
  model = parts.model
  d = config.data
  shape = (_BATCH.value, d.image_size, d.image_size, d.num_channels)
  x, t = train_state_lib.dummy_inputs(config, _BATCH.value)
  params = jax.jit(lambda r: model.init({"params": r}, x, t, train=False)["params"])(
      jax.random.key(0))

  def model_fn(params):
    return lambda x_t, t_: model.apply({"params": params}, x_t, t_, train=False)

  forward = jax.jit(lambda p, x_: model.apply({"params": p}, x_, t, train=False))
  noise = jax.random.normal(jax.random.key(1), shape)
  forward_s = _best_time(forward, params, noise)
  print(f"model params {train_state_lib.param_count(params):,}, batch {_BATCH.value}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"bare forward pass: {forward_s * 1e3:.1f} ms ({_BATCH.value / forward_s:.1f} images/s)")
  print(f"{'sampler':<15}{'s/step':>9}{'vs forward':>12}{'steps':>7}{'images/s':>10}")

  full = dict(item.split(":") for item in _FULL.value)
  dconf = config.diffusion
  for name in _SAMPLERS.value or sampling.SAMPLERS:
    n = _STEPS.value
    if name == "ancestral":
      # A T=n schedule: the same per-step work as the full loop, n model calls.
      tables = schedules.make_tables(schedules.get_beta_schedule(dconf.schedule, n))
      sampler = sampling.get_sampler(name, tables, model_output=dconf.model_output,
                                     model_var=dconf.model_var)
    else:
      tables = parts.tables
      sampler = sampling.get_sampler(name, tables, model_output=dconf.model_output,
                                     model_var=dconf.model_var, num_steps=n)
    run = jax.jit(lambda p, r, s=sampler: s(model_fn(p), r, shape)[0])
    per_step = _best_time(run, params, jax.random.key(2)) / n
    steps = int(full.get(name, n))
    print(f"{name:<15}{per_step:>9.3f}{per_step / forward_s:>11.2f}x{steps:>7}"
          f"{_BATCH.value / (per_step * steps):>10.3g}")


if __name__ == "__main__":
  process_env.set_defaults()  # an entry point: before jax starts a backend
  jnp.zeros(())  # initialise the backend before timing anything
  app.run(main)
