"""Every accelerator figure in one command: run it once when a GPU or TPU host is lent.

  pip install -e '.[cuda12,bench]'   # or '.[tpu,bench]' on a TPU VM (bench: torch, diffusers)
  python benchmarks/device_check.py [--out=device_check.md]

In a fresh clone, after that install, it runs (each stage a child process with its own time
limit, about 8 minutes in all on one modern GPU) and writes one Markdown table:
  1. the CIFAR-10 train step (35.7M params) at batch 128, float32 then bfloat16: step time,
     images/s and MFU against the device's published peak (`benchmarks/train_throughput.py`);
  2. one forward pass and one DDIM step at batch 128 in bfloat16
     (`benchmarks/sampling_throughput.py`);
  3. diffusers' `UNet2DModel` as the same network on the same device, bf16 autocast and
     `torch.compile`, against ours (`benchmarks/vs_diffusers.py`), when torch sees the device;
  4. the quickstart (`configs/digits.py`, 2,500 steps): time to its digits score, and the score.
A stage that fails or runs out of time is a row saying so; the others still run. `--smoke`
shrinks every stage (digits-sized, a few steps) to check the plumbing on a CPU in about a minute;
its figures mean nothing.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def define_flags() -> None:
  """The command line (defined only when run as a program, so importing this module for its
  functions defines no flags)."""
  flags.DEFINE_string("out", "device_check.md", "Markdown file to write.")
  flags.DEFINE_integer("batch", 128, "Global batch of the CIFAR-10 stages.")
  flags.DEFINE_integer("steps", 20, "Timed train steps per precision.")
  flags.DEFINE_bool("smoke", False, "Tiny stages: check the plumbing, not the device.")


def _run(argv: list[str], timeout: float) -> tuple[str, str | None]:
  """(the child's stdout and stderr, None) or (what it wrote so far, a one-line failure)."""
  try:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return out, f"timed out after {timeout:.0f} s"
  if proc.returncode:
    tail = (proc.stdout.strip().splitlines() or ["?"])[-1][:200]
    return proc.stdout, f"failed (exit {proc.returncode}): {tail}"
  return proc.stdout, None


def _field(text: str, name: str) -> str:
  m = re.search(rf"^{re.escape(name)}\s+(.*)$", text, re.M)
  return m.group(1).strip() if m else "?"


def describe_device() -> str:
  out, err = _run(["-c", "import jax; d = jax.devices(); print(len(d), 'x', d[0].device_kind, "
                         "'(' + d[0].platform + ')', 'jax', jax.__version__)"], 300)
  return err or out.strip().splitlines()[-1]


def torch_sees_accelerator() -> bool:
  out, err = _run(["-c", "import torch; print(torch.cuda.is_available())"], 300)
  return err is None and out.strip().endswith("True")


def main(argv):
  del argv
  f = flags.FLAGS
  text = check(f.batch, f.steps, f.smoke)
  print(text)
  with open(f.out, "w", encoding="utf-8") as out:
    out.write(text)


def check(batch: int, steps: int, smoke: bool) -> str:
  """Runs every stage; returns the Markdown report."""
  cifar = "configs/digits.py" if smoke else "configs/cifar10.py"
  batch, steps = (16, 2) if smoke else (batch, steps)
  rows, extra = [], []
  started = time.perf_counter()

  def stage(name, argv, timeout, parse):
    t0 = time.perf_counter()
    out, err = _run(argv, timeout)
    result = err or parse(out)
    rows.append((name, result, f"`python {' '.join(argv)}`", time.perf_counter() - t0))
    print(f"{name}: {result} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out

  device = describe_device()
  print(f"device: {device}", flush=True)
  for dtype in ("float32", "bfloat16"):
    stage(f"train step, batch {batch}, {dtype}",
          ["benchmarks/train_throughput.py", f"--config={cifar}", f"--batch={batch}",
           f"--steps={steps}", f"--config.model.dtype={dtype}"], 150,
          lambda o: (f"{_field(o, 'step time')}, {_field(o, 'images/s')} images/s, MFU "
                     f"{_field(o, 'MFU')} (compile {_field(o, 'compile time')})"))

  def sampler_result(out):
    fwd = re.search(r"bare forward pass: (.*)", out)
    ddim = re.search(r"^ddim\s+(\S+)\s+(\S+)", out, re.M)
    return (f"forward {fwd.group(1) if fwd else '?'}; DDIM step "
            f"{float(ddim.group(1)) * 1e3:.1f} ms = {ddim.group(2)} a forward pass"
            if ddim else "?")

  stage(f"forward and one DDIM step, batch {batch}, bfloat16",
        ["benchmarks/sampling_throughput.py", f"--config={cifar}", f"--batch={batch}",
         "--steps=4", "--samplers=ddim", "--config.model.dtype=bfloat16"], 120, sampler_result)

  def kernels(out):
    found = re.search(r"attention kernels: (.*)", out)
    return found.group(1) if found else "?"

  stage("attention kernel (bfloat16)", ["benchmarks/attention_kernel.py"], 120, kernels)

  if torch_sees_accelerator():
    with tempfile.TemporaryDirectory() as tmp:
      md = os.path.join(tmp, "vs.md")
      stage(f"vs diffusers UNet2DModel (bf16 autocast, torch.compile), batch {batch}",
            ["benchmarks/vs_diffusers.py", f"--config={cifar}", f"--batches={batch}",
             "--precision=bfloat16", "--torch_compile", f"--markdown={md}", "--rounds=2"], 240,
            lambda o: "table below")
      if os.path.exists(md):
        with open(md, encoding="utf-8") as f:
          extra.append(f.read())
  else:
    rows.append(("vs diffusers UNet2DModel", "skipped: torch sees no CUDA device "
                 "(pip install -e '.[bench]' with a CUDA build of torch)", "", 0.0))

  with tempfile.TemporaryDirectory() as tmp:
    quick = ["-m", "ddpm_jax.main", "--config=configs/digits.py", f"--workdir={tmp}/digits"]
    if smoke:
      quick += ["--config.training.num_train_steps=20", "--config.training.sample_every=1000",
                "--config.sampling.num_samples=32", "--config.sampling.num_steps=4"]

    def quick_result(out):
      fd = re.search(r"Digits score of .*?: FD (\S+) against", out)
      return (f"{time.perf_counter() - t_quick:.0f} s to the digits score "
              f"(FD {fd.group(1) if fd else '?'})")

    t_quick = time.perf_counter()
    stage("quickstart (configs/digits.py, train + digits score)", quick, 240, quick_result)

  lines = [f"Device: {device}. Total {time.perf_counter() - started:.0f} s"
           f"{' (--smoke: the figures mean nothing)' if smoke else ''}.", "",
           "| stage | result | command | wall s |", "|---|---|---|---:|"]
  lines += [f"| {n} | {r} | {c} | {s:.0f} |" for n, r, c, s in rows]
  return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


if __name__ == "__main__":
  define_flags()
  app.run(main)
