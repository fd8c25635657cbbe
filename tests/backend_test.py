"""The wrong-backend guard: an accelerator host whose JAX sees only CPUs stops before compiling."""

import os
import subprocess
import sys

import pytest

from ddpm_jax.runtime import backend

from helpers import REPO_ROOT
from helpers import subprocess_env

NOTHING = lambda path: False  # a host without TPU or NVIDIA device files


@pytest.mark.parametrize("environ,files,want", [
    ({}, (), None),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, (), "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, (), "tpu"),
    ({"TPU_NAME": ""}, (), None),  # set but empty says nothing
    ({}, ("/dev/accel0",), "tpu"),
    ({}, ("/dev/vfio/0",), "tpu"),
    ({}, ("/proc/driver/nvidia/version",), "gpu"),
    ({}, ("/dev/nvidia0",), "gpu"),
])
def test_host_accelerator(environ, files, want):
  kind, evidence = backend.host_accelerator(environ, lambda p: p in files)
  assert kind == want
  assert bool(evidence) == (want is not None)


def test_plain_cpu_host_runs_on_its_cpu():
  assert backend.check("auto", ["cpu"] * 4, {}, NOTHING) == "cpu"


@pytest.mark.parametrize("environ,files,platform,install", [
    ({"TPU_ACCELERATOR_TYPE": "v4-8"}, (), "auto", "pip install -e '.[tpu]'"),
    ({}, ("/dev/nvidia0",), "auto", "pip install -e '.[cuda12]'"),
    ({}, (), "tpu", "pip install -e '.[tpu]'"),  # the user asks for one on a plain host
    ({}, (), "gpu", "pip install -e '.[cuda12]'"),
])
def test_accelerator_expected_but_only_cpus_stops(environ, files, platform, install):
  exists = lambda p: p in files
  with pytest.raises(backend.BackendError) as e:
    backend.check(platform, ["cpu"] * 4, environ, exists)
  assert install in str(e.value) and "--platform=cpu" in str(e.value)
  assert "JAX sees only cpu devices" in str(e.value)


def test_accelerator_found_or_cpu_asked_for_passes():
  tpu_host = {"TPU_ACCELERATOR_TYPE": "v4-8"}
  assert backend.check("auto", ["tpu"] * 4, tpu_host, NOTHING) == "tpu"
  assert backend.check("gpu", ["gpu"], {}, NOTHING) == "gpu"
  assert backend.check("cpu", ["cpu"], tpu_host, NOTHING) == "cpu"  # the user means it
  with pytest.raises(ValueError, match=r"--platform='ipu'.*'tpu'"):
    backend.check("ipu", ["cpu"], {}, NOTHING)


def test_missing_plugin_stops_before_distributed_init():
  pod = {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}
  with pytest.raises(backend.BackendError, match=r"\['libtpu'\] is installed.*\.\[tpu\]"):
    backend.check_plugin("auto", pod, NOTHING, lambda name: None)
  backend.check_plugin("auto", pod, NOTHING, lambda name: object())  # libtpu present
  backend.check_plugin("cpu", pod, NOTHING, lambda name: None)
  backend.check_plugin("auto", {}, NOTHING, lambda name: None)  # a plain host needs nothing


def _run(tmp_path, env_extra, *flags):
  env = {**subprocess_env(1), **env_extra}
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "ddpm_jax.main", "--config=configs/digits.py",
       f"--workdir={workdir}", *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  return proc, workdir


@pytest.mark.slow
def test_cli_on_a_tpu_pod_without_libtpu_stops_with_the_install_command(tmp_path):
  """This machine has no libtpu: told it is a pod worker, the CLI stops at once (before
  jax.distributed would look for the slice), writes nothing, and names the fix."""
  proc, workdir = _run(tmp_path, {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3",
                                  "TPU_ACCELERATOR_TYPE": "v5litepod-16"})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "pip install -e '.[tpu]'" in proc.stderr and "--platform=cpu" in proc.stderr
  assert not os.path.exists(workdir)
  # --platform=cpu passes the guard (and, this being no pod, skips jax.distributed): the run
  # goes on to its own checks, here the missing checkpoint of --mode=sample.
  proc, _ = _run(tmp_path, {"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, "--platform=cpu",
                 "--multihost=off", "--mode=sample")
  assert "pip install" not in proc.stderr
  assert "No checkpoint" in proc.stderr, proc.stderr[-2000:]
