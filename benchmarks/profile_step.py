"""Where a train step (or a forward pass) spends its time: XLA's own per-op trace, as a table.

  pip install -e '.[bench]'
  python benchmarks/profile_step.py --config=configs/cifar10.py --batch=8
  python benchmarks/profile_step.py --config=configs/cifar10.py --batch=8 --what=forward

Captures a `jax.profiler` trace of `--steps` compiled calls, reads it back with xprof, and adds up
the time of every XLA thunk (a fusion, a convolution, a library call ...). Each op is described by
what its fused computation computes (the root instruction and its shapes), so a convolution shows
up as forward, input-gradient or filter-gradient from its `dim_labels` and window. On XLA:CPU,
independent thunks run concurrently on the thread pool, so op times are thread-time: they add up
to more than the wall time.
"""

import collections
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from benchmarks import perf
from ddpm_jax.config import validation
from ddpm_jax.runtime import process_env

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Profiled calls (after one warm-up call).")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "forward"], "The program to profile.")
_TOP = flags.DEFINE_integer("top", 10, "Rows of the per-op table.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "", "Keep the trace here ('' = a temp dir).")

def _program(config, batch: int):
  """(compiled program, its arguments) for the train step or the eval forward pass."""
  setup = perf.train_setup(config, batch)
  if _WHAT.value == "train":
    args = (setup.state, setup.batch)
    return setup.step_fn.lower(*args).compile(), args, True
  fwd = jax.jit(lambda p, x, t: setup.model.apply({"params": p}, x, t, train=False))
  args = (setup.state.params, jnp.asarray(setup.images), jnp.full((batch,), 500, jnp.int32))
  return fwd.lower(*args).compile(), args, False


def main(_):
  config = _CONFIG.value
  with config.unlocked():
    config.training.batch_size = _BATCH.value
  validation.validate(config, mode="sample")
  compiled, args, is_train = _program(config, _BATCH.value)
  names = perf.describe_ops(compiled.as_text())

  def call(args):
    out = compiled(*args)
    jax.block_until_ready(out)
    return (out[0], args[1]) if is_train else args

  args = call(args)  # warm-up
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="ddpm_jax_trace_")
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    args = call(args)
  wall = (time.perf_counter() - start) / _STEPS.value * 1e3
  jax.profiler.stop_trace()
  times = perf.op_times(trace_dir, _STEPS.value)
  total = sum(times.values())
  by_kind = collections.Counter()
  for name, ms in times.items():
    desc = names.get(name, name)
    by_kind[re.sub(r" -> .*| window \S+", "", desc)] += ms
  threads = os.cpu_count()
  print(f"{_WHAT.value} at batch {_BATCH.value}: {wall:.1f} ms wall per call (under the "
        f"profiler), {total:.1f} ms of op thread-time in {len(times)} thunks; trace in "
        f"{trace_dir}\n{threads} threads x wall - op time = "
        f"{max(threads * wall - total, 0):.0f} ms per call not inside a traced op (idle "
        f"threads, and the work of Eigen's convolutions, which run as untraced pool tasks)\n")
  print("| # | op | what it computes | ms/call | share |\n|---:|---|---|---:|---:|")
  for i, (name, ms) in enumerate(times.most_common(_TOP.value), 1):
    print(f"| {i} | `{name}` | {names.get(name, '?')} | {ms:.1f} | {ms / total:.1%} |")
  print("\n| kind of op | ms/call | share |\n|---|---:|---:|")
  for kind, ms in by_kind.most_common(12):
    print(f"| {kind} | {ms:.1f} | {ms / total:.1%} |")


if __name__ == "__main__":
  process_env.set_defaults()  # an entry point: before jax starts a backend
  app.run(main)
