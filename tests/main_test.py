"""End-to-end tests of the command line, `python -m ddpm_jax.main`, run as a subprocess."""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import checkpointing

from helpers import REPO_ROOT
from helpers import checkpoint_entries
from helpers import main_command
from helpers import read_log
from helpers import read_metrics
from helpers import restore_state
from helpers import spawned
from helpers import subprocess_env
from helpers import tiny_config
from helpers import wait_all

NEVER = 100_000  # a step count the runs below never reach


def test_misspelt_config_key_fails_before_anything_runs(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(main_command(workdir, "--config.training.batch_szie=8"),
                          env=subprocess_env(1), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode != 0
  assert "batch_szie" in result.stderr
  assert "batch_size" in result.stderr  # ml_collections suggests the key that exists
  assert not os.path.exists(workdir)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir, log_dir = tmp_path / "run", tmp_path / "logs"
  # No periodic checkpoint: the only one must come from the SIGTERM.
  overrides = {"training.num_train_steps": NEVER, "training.checkpoint_every": NEVER}
  with spawned([main_command(workdir, **overrides)], subprocess_env(4), log_dir) as (proc,):
    # A metrics line is written inside the train loop, where SIGTERM is handled.
    deadline = time.monotonic() + 240
    while not read_metrics(workdir):
      assert proc.poll() is None, read_log(log_dir)[-5000:]
      assert time.monotonic() < deadline, "no metrics line within 240 s"
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    (code,) = wait_all([proc], timeout=120)
  log = read_log(log_dir)
  assert code == checkpointing.EXIT_PREEMPTED == 75, log[-5000:]
  match = re.search(r"SIGTERM received: saved step (\d+)", log)
  assert match, log[-5000:]
  saved = int(match.group(1))
  assert 5 <= saved < NEVER
  assert checkpoint_entries(workdir) == [str(saved)]
  assert read_metrics(workdir)[-1]["step"] == saved
  # The checkpoint is complete: the state restores, and so does the data iterator, which then
  # yields the batch that step `saved + 1` would have trained on.
  config = tiny_config(**overrides)
  restored = input_pipeline.create_train_iterator(config)
  assert int(restore_state(config, workdir, restored).step) == saved
  fresh = input_pipeline.create_train_iterator(config)
  for _ in range(saved):
    next(fresh)
  np.testing.assert_array_equal(next(restored)["image"], next(fresh)["image"])


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["import", "compile"])
def test_sigterm_during_start_up_exits_cleanly_as_preempted(tmp_path, moment):
  """A SIGTERM before the first step (imports take seconds, then the restore and compile) ends
  the run with the preemption status and no traceback, having nothing new to save."""
  workdir, log_dir = tmp_path / "run", tmp_path / "logs"
  overrides = {"training.num_train_steps": NEVER}
  env = subprocess_env(4)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a real compile: the window the SIGTERM aims at
  with spawned([main_command(workdir, **overrides)], env, log_dir) as (proc,):
    deadline = time.monotonic() + 240
    if moment == "import":
      time.sleep(1.0)
    else:  # once the model is built, while the train step compiles
      while "parameters." not in read_log(log_dir):
        assert proc.poll() is None, read_log(log_dir)[-5000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    (code,) = wait_all([proc], timeout=180)
  log = read_log(log_dir)
  assert code == checkpointing.EXIT_PREEMPTED, log[-5000:]
  assert "Traceback" not in log, log[-5000:]
  assert "SIGTERM received before the first step" in log
  assert not os.path.exists(workdir / "checkpoints") or checkpoint_entries(workdir) == []
