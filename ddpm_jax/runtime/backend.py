"""The accelerator a run expects against the devices JAX found: stop before training a pod on CPUs.

`pip install -e .` gives JAX without libtpu or CUDA, so on a Cloud TPU VM or a GPU machine JAX
silently falls back to the host's CPU and a run would train for days there. `check` compares
what the host is (or what `--platform` asks for) with `jax.devices()` and raises, naming the
install command, when an accelerator host has only CPU devices. `--platform=cpu` says a CPU run
is meant (a debugging session on a TPU VM, say) and turns the check off.

What a host is, without asking JAX (which cannot tell without its plugin):
  * TPU: Cloud TPU's environment (`TPU_ACCELERATOR_TYPE`, `TPU_WORKER_HOSTNAMES`, `TPU_NAME`,
    `TPU_WORKER_ID`) or TPU device files (`/dev/accel0` on v2-v4, `/dev/vfio/0` on v5 and later);
  * GPU: NVIDIA's driver (`/proc/driver/nvidia/version` or `/dev/nvidia0`).

`check_plugin` runs before `jax.distributed` starts (on a pod slice without libtpu it would look
for a cluster JAX cannot see), `check` after, on the devices JAX found.
"""

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import importlib.util
import os

PLATFORMS = ("auto", "cpu", "gpu", "tpu")
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_NAME", "TPU_WORKER_ID")
TPU_FILES = ("/dev/accel0", "/dev/vfio/0")
GPU_FILES = ("/proc/driver/nvidia/version", "/dev/nvidia0")
# How to get JAX for each accelerator (setup.py's extras pin jax's version).
INSTALL = {"tpu": "pip install -e '.[tpu]'", "gpu": "pip install -e '.[cuda12]'"}
# The module each accelerator's JAX plugin installs.
PLUGINS = {"tpu": ("libtpu",), "gpu": ("jax_cuda12_plugin", "jax_cuda12_pjrt")}


class BackendError(RuntimeError):
  """The run expects an accelerator that JAX does not see."""


def host_accelerator(environ: Mapping[str, str] | None = None,
                     exists: Callable[[str], bool] = os.path.exists) -> tuple[str | None, str]:
  """('tpu' | 'gpu' | None, the evidence) for this host, from its environment and device files."""
  environ = os.environ if environ is None else environ
  for name in TPU_ENV:
    if environ.get(name):
      return "tpu", f"{name}={environ[name]}"
  for path in TPU_FILES:
    if exists(path):
      return "tpu", f"{path} exists"
  for path in GPU_FILES:
    if exists(path):
      return "gpu", f"{path} exists (NVIDIA driver)"
  return None, ""


def _expected(platform: str, environ, exists) -> tuple[str | None, str]:
  if platform not in PLATFORMS:
    raise ValueError(f"--platform={platform!r}; valid choices: {list(PLATFORMS)}.")
  if platform == "cpu":
    return None, ""
  if platform == "auto":
    expected, evidence = host_accelerator(environ, exists)
    return expected, (f"this host has a {expected.upper()} ({evidence})" if expected else "")
  return platform, f"--platform={platform} asks for one"


def _error(why: str, expected: str, found: str) -> BackendError:
  return BackendError(
      f"{why}, but {found}: JAX's {expected.upper()} plugin is not installed, and training would "
      f"run on the host's CPU. Install JAX for the accelerator with `{INSTALL[expected]}` (on "
      "every worker of a pod slice), or pass --platform=cpu to run on the CPU anyway.")


def check_plugin(platform: str, environ: Mapping[str, str] | None = None,
                 exists: Callable[[str], bool] = os.path.exists,
                 find_spec: Callable[[str], object] = importlib.util.find_spec) -> None:
  """Raises BackendError when the expected accelerator's JAX plugin is not installed at all."""
  expected, why = _expected(platform, environ, exists)
  if expected and not any(find_spec(m) is not None for m in PLUGINS[expected]):
    raise _error(why, expected, f"none of {list(PLUGINS[expected])} is installed")


def check(platform: str, device_platforms: Sequence[str],
          environ: Mapping[str, str] | None = None,
          exists: Callable[[str], bool] = os.path.exists) -> str:
  """Raises BackendError when the expected accelerator is missing; returns what runs.

  Args:
    platform: `--platform`: 'auto' (expect what the host has), 'tpu' or 'gpu' (require it), or
      'cpu' (run on the CPU whatever the host has).
    device_platforms: the `.platform` of each of `jax.devices()` ('cpu', 'tpu', 'gpu', ...).
    environ, exists: the environment and a file test (for tests).
  """
  found = sorted(set(device_platforms))
  expected, why = _expected(platform, environ, exists)
  if expected is None:
    return "cpu" if platform == "cpu" or not found else found[0]
  if expected in found or (expected == "gpu" and "cuda" in found):
    return expected
  raise _error(why, expected, f"JAX sees only {', '.join(found) or 'no'} devices")
