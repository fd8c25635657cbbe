"""Test-wide JAX setup: the entry points' process defaults, 4 simulated CPU devices and fast
compiles.

This must run before anything imports jax, which pytest guarantees for conftest.py.

Every program compiled in this process, in the other pytest-xdist worker or in a child process
(workers and the CLI runs of the end-to-end tests inherit the environment this file sets up in
the controller, before the workers start) goes to one persistent compilation cache per test
session, so the many runs of the same tiny model compile each program once. Set
JAX_COMPILATION_CACHE_DIR to choose the directory yourself.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="ddpm_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from ddpm_jax.runtime import process_env  # noqa: E402  (imports nothing heavy)

process_env.set_defaults()  # as `python -m ddpm_jax.main` does: the same XLA kernels

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests check maths and plumbing, not XLA's optimiser; this roughly halves compile time.
jax.config.update("jax_disable_most_optimizations", True)


# The end-to-end files that run longest start first, so that with two workers (pytest.ini) the
# short files fill the other worker instead of one long file finishing alone at the end.
_LONGEST_FIRST = ("multihost_test.py", "restoration_test.py", "gcs_test.py", "finetune_test.py",
                  "sweep_test.py", "posthoc_ema_train_test.py", "train_step_test.py",
                  "train_test.py", "restore_cascade_test.py", "main_test.py",
                  "checkpointing_test.py", "interop_test.py", "recovery_test.py",
                  "sharding_test.py", "parameterization_test.py", "dit_test.py",
                  "drivers_test.py", "editing_test.py", "guidance_test.py",
                  "sampling_exact_score_test.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file


@pytest.fixture
def optimized_xla():
  """XLA's optimisations back on, for a module whose programs run far longer than they compile.

  The suite turns most of them off (above) because its tiny models compile more than they run;
  the samplers of the closed-form posterior and exact-score tests are the other way round: a
  200-step DDIM over 16,384 images runs about 2x faster optimised (fused elementwise loops).
  """
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", True)
