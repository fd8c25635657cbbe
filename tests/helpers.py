"""Shared pieces of the trainer tests: a tiny config, its command-line form, and subprocesses.

The tiny settings live in one flat dict, `TINY`, so that the in-process tests
(`tiny_config`) and the command-line tests (`main_command`) train the same model.
"""

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import subprocess
import sys
import time
import traceback

from absl import flags
import jax
import ml_collections
import numpy as np

from configs import cifar10
from configs import digits
from ddpm_jax.config import factories
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import logging_lib
from ddpm_jax.runtime import mesh as mesh_lib
from ddpm_jax.runtime import train_state as train_state_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 1-level U-Net (about 160k parameters) with 8 GroupNorm groups of 4 channels (32) and 8 (the
# 64-channel skip concatenations). The real model's 32 groups would be one channel each, and then
# the bias of the conv before a GroupNorm has an exactly zero gradient (the norm removes a
# per-channel constant): Adam turns its rounding noise into steps of about lr, and 1- vs 4-device
# runs would differ by float rounding. The grid sampler takes 2 DDIM steps for 4 images, and
# nothing is sampled mid-run.
TINY = {
    "model.ch": 32,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.num_groups": 8,
    "model.dropout": 0.0,
    "diffusion.num_timesteps": 20,
    "training.batch_size": 8,
    "training.log_every": 5,
    "training.checkpoint_every": 10,
    "training.sample_every": 1_000_000,
    "training.num_grid_samples": 4,
    "training.grid_sampler_steps": 2,
    "training.final_eval_metrics": (),
    "optim.warmup_steps": 5,
    "sampling.num_steps": 10,  # at most T
    "sampling.batch_size": 8,
    "eval.batch_size": 8,
}

_CONFIG_FILES = {"digits": "configs/digits.py", "cifar10": "configs/cifar10.py"}
_GET_CONFIG = {"digits": digits.get_config, "cifar10": cifar10.get_config}


def tiny_config(name: str = "digits", **overrides) -> ml_collections.ConfigDict:
  """configs/<name>.py with `TINY` and then `overrides` applied.

  Args:
    name: 'digits' or 'cifar10'.
    **overrides: flat dotted keys, e.g. `**{"training.num_train_steps": 3}`.
  """
  config = _GET_CONFIG[name]()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def _flag_value(value) -> str:
  # config_flags parses tuples from their Python literal, so "(1,)" and "()" round-trip.
  return repr(value) if isinstance(value, tuple) else str(value)


def main_command(workdir, *flags: str, name: str = "digits", **overrides) -> list[str]:
  """The command line of `python -m ddpm_jax.main --mode=train` on `tiny_config(name, ...)`.

  Args:
    workdir: the run's --workdir.
    *flags: further flags, e.g. "--process_id=1".
    name: 'digits' or 'cifar10'.
    **overrides: config overrides with flat dotted keys, as in `tiny_config`.
  """
  settings = {**TINY, **overrides}
  return [sys.executable, "-m", "ddpm_jax.main",
          f"--config={os.path.join(REPO_ROOT, _CONFIG_FILES[name])}", f"--workdir={workdir}",
          *(f"--config.{k}={_flag_value(v)}" for k, v in settings.items()), *flags]


@dataclasses.dataclass
class Completed:
  """What `run_main` gives back, shaped like subprocess.CompletedProcess."""
  returncode: int
  stdout: str
  stderr: str


def run_main(command: list[str], module: str = "ddpm_jax.main") -> Completed:
  """Runs `python -m MODULE ...` (`main_command`'s list, or only its flags) in this process.

  MODULE is one of the entry points (ddpm_jax.main, .import_checkpoint, .export_checkpoint,
  .posthoc_ema, .pack_folder). Its flags are parsed on a FlagValues of their own and its `main`
  runs them, as the program does; what a child process would add is its start-up (about 10 s of
  imports and a cold compile), which only the tests of the programs themselves (main_test.py,
  multihost_test.py, gcs_test.py) pay for. An exception or a sys.exit becomes a non-zero return
  code with the message and its traceback on `stderr`. It runs on this process's 4 simulated
  devices.
  """
  entry = importlib.import_module(module)
  if command[:3] == [sys.executable, "-m", module]:
    command = command[3:]
  argv = [module, *command]
  out, err, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      flag_values = flags.FlagValues()
      if "sys_argv" in inspect.signature(entry.define_flags).parameters:
        args = entry.define_flags(flag_values, sys_argv=argv)
      else:
        args = entry.define_flags(flag_values)
      entry.main(flag_values(argv), args)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
      if not isinstance(e.code, int) and e.code is not None:
        print(e.code, file=sys.stderr)
    except Exception:  # pylint: disable=broad-exception-caught
      traceback.print_exc()
      code = 1
  return Completed(code, out.getvalue(), err.getvalue())


def subprocess_env(num_devices: int) -> dict:
  """A child JAX process on `num_devices` simulated CPU devices with fast compiles.

  Children do not inherit the test process's JAX setup (conftest.py), so it is spelt out; the
  XLA flags other than the device count are the test process's own. They do inherit the
  session's persistent compilation cache (conftest.py sets JAX_COMPILATION_CACHE_DIR in the
  environment), so a program that a test, another child or a resumed job already compiled with
  the same flags is loaded rather than compiled again.

  Args:
    num_devices: simulated CPU devices of the child.
  """
  env = dict(os.environ)
  others = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={num_devices}",
                                 *others]),
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return env


@contextlib.contextmanager
def spawned(commands: list[list[str]], env: dict, log_dir):
  """Starts every command, logging each to `log_dir/proc<i>.log`; kills survivors on exit.

  Output goes to files, not pipes: Orbax logs enough to fill a pipe and block the child.
  """
  os.makedirs(log_dir, exist_ok=True)
  procs = []
  try:
    for i, command in enumerate(commands):
      with open(os.path.join(log_dir, f"proc{i}.log"), "wb") as log:
        procs.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log,
                                      stderr=subprocess.STDOUT))
    yield procs
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    for proc in procs:
      proc.wait(timeout=30)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
  """Return codes once all exit, or as soon as one fails (the rest could hang in a collective).

  A process still running at the deadline, or after another failed, gets None.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    codes = [proc.poll() for proc in procs]
    if all(code is not None for code in codes) or any(code for code in codes):
      return codes
    time.sleep(0.2)
  return [proc.poll() for proc in procs]


def read_log(log_dir, index: int = 0) -> str:
  with open(os.path.join(log_dir, f"proc{index}.log"), encoding="utf-8", errors="replace") as f:
    return f.read()


def read_metrics(workdir) -> list[dict]:
  """The merged metrics history of `workdir`, one record per step ([] before the first one)."""
  return logging_lib.read_metrics(workdir)


def checkpoint_entries(workdir) -> list[str]:
  """Every entry of `workdir/checkpoints`, complete step directories and temporary ones."""
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def restore_state(config, workdir, data_iter=None, step: int | None = None):
  """The full TrainState of a checkpoint (the newest by default) as NumPy arrays.

  `data_iter`, when given, is moved to the position saved with it.
  """
  target = train_state_lib.create_train_state(config, factories.create_model(config),
                                              mesh_lib.make_mesh())
  manager = checkpointing.create_manager(workdir, keep=None, read_only=True)
  try:
    return jax.device_get(checkpointing.restore(manager, target, data_iter, step=step))
  finally:
    manager.close()


class FakeInception:
  """A fixed random projection of the pixels, standing in for Inception's pool3 and logits.

  Feeds must be uint8 RGB 8x8 (the digits as the drivers hand them over), as the real network
  expects; `calls` counts the batches embedded.
  """

  def __init__(self, feature_dim: int):
    rng = np.random.default_rng(0)
    self._pool3 = rng.normal(size=(8 * 8 * 3, feature_dim))
    self._logits = rng.normal(size=(8 * 8 * 3, 10)) / 8.0
    self.calls = 0

  def __call__(self, batch):
    batch = np.asarray(batch)
    assert batch.dtype == np.uint8 and batch.shape[1:] == (8, 8, 3), (batch.dtype, batch.shape)
    self.calls += 1
    x = batch.reshape(len(batch), -1).astype(np.float64) / 255.0
    return {"pool3": x @ self._pool3, "logits": x @ self._logits}
