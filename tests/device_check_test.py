"""benchmarks/device_check.py's report from its stages' output, with the child processes faked.

The real run needs an accelerator (and minutes); here every child prints what the real scripts
print, so the test checks what the script makes of it: one row per stage, the figures parsed,
a failing or timed-out stage reported as such while the others still run, the diffusers stage
only when torch sees a device.
"""

import sys

import pytest

from helpers import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
from benchmarks import device_check  # noqa: E402  pylint: disable=g-import-not-at-top

TRAIN = """devices           1 x NVIDIA H200
params            35,746,307
global batch      128
step time         101.5 ms
images/s          1261.1
compute dtype     bfloat16
MFU               31.2%
compile time      41.0 s
"""
SAMPLING = """model params 35,746,307, batch 128, 1 x NVIDIA H200
bare forward pass: 20.0 ms (6400.0 images/s)
sampler          s/step  vs forward  steps  images/s
ddim              0.021       1.05x     50       122
"""
QUICKSTART = ("I1203 12:00:00 quality.py:85] Digits score of 500 samples from dpm_solver_pp_sde_50 "
              "(50 model calls each): FD 77.83 against held-out real digits; floor 53.68\n")


def fake_children(torch_device: bool, failing: str = ""):
  calls = []

  def run(argv, timeout):
    calls.append(argv)
    joined = " ".join(argv)
    if failing and failing in joined:
      return "partial output\n", "failed (exit 1): RuntimeError: out of memory"
    if argv[0] == "-c" and "jax" in joined:
      return "1 x NVIDIA H200 (gpu) jax 0.10.2\n", None
    if argv[0] == "-c" and "torch" in joined:
      return f"{torch_device}\n", None
    if "train_throughput" in joined:
      return TRAIN, None
    if "sampling_throughput" in joined:
      return SAMPLING, None
    if "vs_diffusers" in joined:
      md = next(a.split("=", 1)[1] for a in argv if a.startswith("--markdown="))
      with open(md, "w", encoding="utf-8") as f:
        f.write("| workload | batch | ratio |\n|---|---:|---:|\n| train | 128 | **1.10x** |\n")
      return "", None
    if "ddpm_jax.main" in joined:
      return QUICKSTART, None
    if "attention_kernel" in joined:
      return "attention kernels: 12 x 64: cudnn; 1 x 256: xla\n", None
    raise AssertionError(joined)

  return run, calls


def test_report_has_every_stage_with_its_figures(monkeypatch):
  run, calls = fake_children(torch_device=True)
  monkeypatch.setattr(device_check, "_run", run)
  text = device_check.check(128, 20, smoke=False)
  assert text.startswith("Device: 1 x NVIDIA H200 (gpu) jax 0.10.2.")
  report = text.split("\n\n")[1]  # the stage table; diffusers' own table follows it
  stages = [r.split(" | ")[0][2:] for r in report.splitlines()[2:]]
  assert stages == ["train step, batch 128, float32", "train step, batch 128, bfloat16",
                    "forward and one DDIM step, batch 128, bfloat16",
                    "attention kernel (bfloat16)",
                    "vs diffusers UNet2DModel (bf16 autocast, torch.compile), batch 128",
                    "quickstart (configs/digits.py, train + digits score)"]
  assert "101.5 ms, 1261.1 images/s, MFU 31.2% (compile 41.0 s)" in text
  assert "forward 20.0 ms (6400.0 images/s); DDIM step 21.0 ms = 1.05x a forward pass" in text
  assert "| train | 128 | **1.10x** |" in text  # diffusers' table, appended
  assert "(FD 77.83)" in text
  assert "| attention kernel (bfloat16) | 12 x 64: cudnn; 1 x 256: xla |" in text
  assert any("--config.model.dtype=bfloat16" in a for argv in calls for a in argv)
  assert any("--torch_compile" in argv for argv in calls)


def test_a_failing_stage_is_a_row_and_the_rest_still_run(monkeypatch):
  run, calls = fake_children(torch_device=False, failing="--config.model.dtype=float32")
  monkeypatch.setattr(device_check, "_run", run)
  text = device_check.check(128, 20, smoke=False)
  assert "| train step, batch 128, float32 | failed (exit 1): RuntimeError: out of memory |" in text
  assert "MFU 31.2%" in text  # bfloat16 still ran
  assert "skipped: torch sees no CUDA device" in text
  assert not any("vs_diffusers" in " ".join(argv) for argv in calls)
  assert "(FD 77.83)" in text


@pytest.mark.parametrize("smoke", [True, False])
def test_smoke_shrinks_every_stage(monkeypatch, smoke):
  run, calls = fake_children(torch_device=False)
  monkeypatch.setattr(device_check, "_run", run)
  text = device_check.check(128, 20, smoke=smoke)
  configs = {a for argv in calls for a in argv if a.startswith("--config=")}
  assert configs == ({"--config=configs/digits.py"} if smoke else
                     {"--config=configs/cifar10.py", "--config=configs/digits.py"})
  assert ("figures mean nothing" in text) == smoke
