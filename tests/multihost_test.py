"""A 2-process run of `python -m ddpm_jax.main` over loopback (gloo collectives on CPU).

Each process has 2 simulated CPU devices, so the mesh spans 4 devices over 2 processes, as on
two hosts. The first run trains and checkpoints; a second job resumes it.
"""

import json
import os
import re

import portpicker

from helpers import checkpoint_entries
from helpers import main_command
from helpers import read_log
from helpers import read_metrics
from helpers import spawned
from helpers import subprocess_env
from helpers import wait_all

NUM_PROCESSES = 2
TIMEOUT_S = 300  # per job; generous because both processes compile on a shared 2-core machine


def _run_job(workdir, log_dir, num_train_steps: int) -> list[str]:
  """Runs one 2-process job to completion and returns each process's log."""
  port = portpicker.pick_unused_port()
  commands = [
      main_command(workdir, f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={NUM_PROCESSES}", f"--process_id={i}",
                   **{"training.num_train_steps": num_train_steps,
                      "training.checkpoint_every": 2, "training.log_every": 2})
      for i in range(NUM_PROCESSES)]
  with spawned(commands, subprocess_env(2), log_dir) as procs:
    codes = wait_all(procs, TIMEOUT_S)
  logs = [read_log(log_dir, i) for i in range(NUM_PROCESSES)]
  assert codes == [0] * NUM_PROCESSES, "\n\n".join(log[-4000:] for log in logs)
  return logs


def _data_states(workdir, step: int) -> dict:
  """{file name: grain iterator state} of a checkpoint's data item."""
  data_dir = os.path.join(workdir, "checkpoints", str(step), "data")
  states = {}
  for name in sorted(os.listdir(data_dir)):
    if name.endswith(".json"):
      with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        states[name] = json.load(f)
  return states


def _final_loss(log: str, step: int) -> str:
  match = re.search(rf"step {step}/{step} .*?loss=(\S+)", log)
  assert match, log[-4000:]
  return match.group(1)


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir = tmp_path / "run"
  logs = _run_job(workdir, tmp_path / "first", num_train_steps=4)

  for index, log in enumerate(logs):
    assert re.search(r"4 devices over 2 process", log), log[-4000:]
    assert re.search(rf"this is process {index} with 2 local devices", log), log[-4000:]
  # Metrics are pmean-ed over all 4 devices, so both processes log the same loss.
  assert _final_loss(logs[0], 4) == _final_loss(logs[1], 4)
  assert [line["step"] for line in read_metrics(workdir)] == [2, 4]  # process 0 writes alone
  assert checkpoint_entries(workdir) == ["2", "4"]
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  # Each process saved the position of its own shard of the data.
  first = _data_states(workdir, 4)
  assert list(first) == ["process_0-of-2.json", "process_1-of-2.json"]
  for index, state in enumerate(first.values()):
    assert f"shard_index={index}, shard_count=2" in state["sampler"]
  positions = [state["last_seen_indices"] for state in first.values()]
  assert positions[0] != positions[1]

  logs = _run_job(workdir, tmp_path / "second", num_train_steps=6)
  assert [line["step"] for line in read_metrics(workdir)] == [2, 4, 6]  # resumed at 4
  assert checkpoint_entries(workdir) == ["2", "4", "6"]
  second = _data_states(workdir, 6)
  assert list(second) == list(first)
  for name, state in second.items():
    # Each iterator went on from its saved position rather than starting over.
    for key, index in state["last_seen_indices"].items():
      assert index > first[name]["last_seen_indices"][key], (name, state)
