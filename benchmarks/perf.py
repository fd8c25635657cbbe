"""Performance accounting: device peaks for MFU, and XLA's per-op profile of a compiled program.

The benchmarks' shared library (`from benchmarks import perf`), not an entry point: the scripts
that import it set the process defaults. `train_setup` builds what every train-step benchmark
times; `benchmarks/train_throughput.py` reports MFU with `peak_tflops`;
`benchmarks/profile_step.py` turns a `jax.profiler` trace into a per-op table with `describe_ops`
and `op_times`.
"""

import collections
import glob
import json
import os
import re
import time
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.config import factories
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import train_state
from ddpm_jax.training import train_step

# Thread-pool bookkeeping events that enclose XLA:CPU's ops rather than being ops.
_NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "$")


# Dense peak TFLOP/s per chip by (device_kind prefix, compute dtype), from the vendors' data
# sheets (dense, no sparsity). The longest matching prefix wins.
PEAK_TFLOPS = {
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5", "bfloat16"): 459.0,     # v5p
    ("TPU v6 lite", "bfloat16"): 918.0,
    ("NVIDIA A100", "bfloat16"): 312.0,
    ("NVIDIA A100", "float32"): 156.0,  # TF32
    ("NVIDIA H100 PCIe", "bfloat16"): 756.0,
    ("NVIDIA H100 PCIe", "float32"): 378.0,
    ("NVIDIA H100", "bfloat16"): 989.0,  # SXM
    ("NVIDIA H100", "float32"): 494.0,
    ("NVIDIA H200", "bfloat16"): 989.0,
    ("NVIDIA H200", "float32"): 494.0,
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The published dense peak of one device for `dtype`, or None when it is not in the table."""
  matches = [(len(k), v) for (k, d), v in PEAK_TFLOPS.items()
             if device_kind.startswith(k) and d == dtype]
  return max(matches)[1] if matches else None


class TrainSetup(NamedTuple):
  """What a benchmark of the train step needs, built from a config as training would."""
  mesh: jax.sharding.Mesh
  model: Any
  tables: Any
  state: train_state.TrainState
  step_fn: Any
  images: np.ndarray   # this process's rows of the global batch, uniform in [-1, 1]
  batch: dict          # the global batch the step takes


def train_setup(config, global_batch: int) -> TrainSetup:
  """The config's model, initial state, jitted step and a fixed random batch, on every device."""
  mesh = mesh_lib.make_mesh()
  model = factories.create_model(config)
  tables = factories.tables_from_config(config)
  state = train_state.create_train_state(config, model, mesh)
  step_fn = train_step.from_config(config, model, factories.loss_fn_from_config(config, tables),
                                   mesh)
  d = config.data
  images = np.random.default_rng(0).uniform(
      -1, 1, (global_batch // jax.process_count(), d.image_size, d.image_size, d.num_channels)
  ).astype(np.float32)
  batch = mesh_lib.global_batch(
      mesh, {"image": images, "preempt": np.zeros((jax.local_device_count(),), np.bool_)})
  return TrainSetup(mesh, model, tables, state, step_fn, images, batch)


def matmul_gflops(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def describe_ops(hlo_text: str) -> dict[str, str]:
  """Instruction name -> a short description of what it computes (the fused root, if a fusion)."""
  roots = {}
  for comp, body in re.findall(r"^%?(\S+) \([^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M):
    for line in body.splitlines():
      if "ROOT" in line:
        roots[comp] = line.split("ROOT", 1)[1].strip()
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if not m:
      continue
    name, rhs = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rhs)
    instr = roots.get(called.group(1), line) if called and "fusion(" in rhs else line
    scope = re.search(r'op_name="([^"]*)"', instr) or re.search(r'op_name="([^"]*)"', line)
    out[name] = _summarise(instr) + (f" [{_scope(scope.group(1))}]" if scope else "")
  return out


def _scope(op_name: str) -> str:
  """'jit(step)/transpose(jvp(UNet))/up_0_res_1/conv1/conv_general_dilated' ->
  'up_0_res_1/conv1'."""
  parts = [p for p in op_name.split("/") if not re.match(r"^(jit|jvp|transpose|vmap)\(", p)]
  return "/".join(parts[:-1]) or op_name.split("/")[-1]


def _summarise(instr: str) -> str:
  """One HLO instruction -> 'conv input-grad window 3x3 -> f32[..]', 'dot -> f32[..]', ...

  XLA computes a filter gradient as a convolution whose window spans the image (and drops the
  metadata), so a window wider than 3 (our largest kernel) marks one. A convolution of the
  backward pass (metadata `transpose(jvp(...))`) with a kernel-sized window is an input gradient.
  """
  shape = re.search(r"= (\S+\[[^\]]*\])", instr) or re.match(r"(\S+\[[^\]]*\])", instr)
  shape = shape.group(1) if shape else ""
  body = re.sub(r"^\s*(ROOT )?%?[\w.\-]+ = ", "", instr)
  op = re.search(r"\s([a-z][a-z\-]*)\(", body)
  op = op.group(1) if op else "?"
  if op != "convolution":
    return f"{op} -> {shape}"
  window = re.search(r"window=\{size=(\d+)x(\d+)", instr)
  size = (int(window.group(1)), int(window.group(2))) if window else (1, 1)
  kind = "filter-grad" if max(size) > 3 else "input-grad" if "transpose(" in instr else "fwd"
  return f"conv {kind} window {size[0]}x{size[1]} -> {shape}"


def op_times(trace_dir: str, num_steps: int) -> dict[str, float]:
  """Thunk name -> mean milliseconds of thread-time per call, from the newest trace in the dir."""
  from xprof.convert import raw_to_tool_data  # pylint: disable=g-import-not-at-top

  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
  events = json.loads(data)["traceEvents"]
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  totals = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "XLAEigen" not in threads.get((e["pid"], e["tid"]), ""):
      continue
    if not e["name"].startswith(_NOT_OPS):
      totals[e["name"]] += e["dur"] / 1e3 / num_steps
  return totals
