"""Two processes of `python -m ddpm_jax.main` over loopback (gloo collectives on CPU).

Each process has 2 simulated CPU devices, so the mesh spans 4 devices over 2 processes, as on
two hosts. A first job trains and checkpoints; a second one resumes it and is then stopped by
a SIGTERM sent to one process only, which both must act on at the same step.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

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

NUM_PROCESSES = 2
NEVER = 100_000  # a step count the jobs below never reach
TIMEOUT_S = 300  # per job; generous because both processes compile on a shared 2-core machine


def _commands(workdir, num_train_steps: int, checkpoint_every: int) -> list[list[str]]:
  port = portpicker.pick_unused_port()
  return [main_command(workdir, f"--coordinator_address=127.0.0.1:{port}",
                       f"--num_processes={NUM_PROCESSES}", f"--process_id={index}",
                       **{"training.num_train_steps": num_train_steps,
                          "training.checkpoint_every": checkpoint_every,
                          "training.log_every": 2})
          for index in range(NUM_PROCESSES)]


def _finish(procs, log_dir, code: int = 0) -> list[str]:
  """Waits for every process to exit with `code` and returns their logs."""
  codes = wait_all(procs, TIMEOUT_S)
  deadline = time.monotonic() + 60
  while code and None in codes and set(codes) <= {code, None} and time.monotonic() < deadline:
    time.sleep(0.2)  # wait_all returns at the first non-zero status; give the others time
    codes = [proc.poll() for proc in procs]
  logs = [read_log(log_dir, index) for index in range(NUM_PROCESSES)]
  assert codes == [code] * NUM_PROCESSES, "\n\n".join(log[-4000:] for log in logs)
  return logs


def _data_state(workdir, step: int) -> dict:
  """The global data-iterator state of a checkpoint (one file, written by process 0)."""
  data_dir = os.path.join(workdir, "checkpoints", str(step), "data")
  assert not [name for name in os.listdir(data_dir) if name.startswith("process_")]
  with open(os.path.join(data_dir, "iterator.json"), encoding="utf-8") as f:
    return json.load(f)


def _logged_loss(log: str, step: int) -> str:
  match = re.search(rf"step {step}/\d+ .*?loss=(\S+)", log)
  assert match, log[-4000:]
  return match.group(1)


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_stop_together(tmp_path):
  """Preemption: JAX's sync point stops both processes at one step with one complete
  checkpoint, exit status 75, and a resumed run matches an uninterrupted one bit for bit."""
  workdir, env = tmp_path / "run", subprocess_env(2)
  with spawned(_commands(workdir, 4, checkpoint_every=2), env, tmp_path / "first") as procs:
    logs = _finish(procs, tmp_path / "first")

  for index, log in enumerate(logs):
    assert re.search(r"4 devices over 2 process", log), log[-4000:]
    assert re.search(rf"this is process {index} with 2 local devices", log), log[-4000:]
  # Metrics are pmean-ed over all 4 devices, so both processes log the same loss.
  assert _logged_loss(logs[0], 4) == _logged_loss(logs[1], 4)
  assert [line["step"] for line in read_metrics(workdir)] == [2, 4]  # process 0 writes alone
  assert checkpoint_entries(workdir) == ["2", "4"]
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  # One global position (batches consumed), the same for every process count.
  assert _data_state(workdir, 4)["position"] == 4

  # The second job resumes at 4; once it is training, only process 1 gets a SIGTERM.
  log_dir = tmp_path / "second"
  with spawned(_commands(workdir, NEVER, checkpoint_every=NEVER), env, log_dir) as procs:
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_metrics(workdir)) < 3:
      assert all(proc.poll() is None for proc in procs), read_log(log_dir, 0)[-4000:]
      assert time.monotonic() < deadline, f"no new metrics line within {TIMEOUT_S} s"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    logs = _finish(procs, log_dir, code=75)  # checkpointing.EXIT_PREEMPTED

  assert read_metrics(workdir)[2]["step"] == 6  # it went on from step 4
  saved = []
  for log in logs:
    match = re.search(r"SIGTERM received: saved step (\d+)", log)
    assert match, log[-4000:]
    saved.append(int(match.group(1)))
  assert saved[0] == saved[1] > 4, saved
  # One complete checkpoint and no temporary directory (2 and 4 are not multiples of this job's
  # checkpoint_every, so the preservation policy keeps only the newest).
  assert checkpoint_entries(workdir) == [str(saved[0])]
  # The iterator went on from its saved position rather than starting over.
  assert _data_state(workdir, saved[0])["position"] == saved[0]

  # Resumed past the preemption, the run equals an uninterrupted one bit for bit.
  end = saved[0] + 2
  with spawned(_commands(workdir, end, checkpoint_every=NEVER), env, tmp_path / "third") as procs:
    _finish(procs, tmp_path / "third")
  straight = tmp_path / "straight"
  with spawned(_commands(straight, end, checkpoint_every=NEVER), env, tmp_path / "ref") as procs:
    _finish(procs, tmp_path / "ref")
  config = tiny_config()
  resumed, expected = restore_state(config, workdir), restore_state(config, straight)
  assert int(resumed.step) == int(expected.step) == end
  for have, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(have, want)


# One FID/IS evaluation: 14 reference and 16 sample images of 8x8 RGB, 4 images per feature
# call (one compiled shape). The property here is how the statistics are split over processes
# and merged, so Inception (whose 23.9M-parameter compile took most of this test's minutes on two
# cores; inception_test checks the network itself) is replaced by a stand-in with its outputs: a
# fixed random projection of the pixels to 2,048 "pool3" features and 1,008 logits. The reference
# split comes from a stand-in eval iterator that yields this process's rows (the last batch padded
# and masked, as the real one does), so both the reference and the sample statistics are merged
# across processes.
_FID_WORKER = r"""
import json, sys
from ddpm_jax.runtime import process_env
process_env.set_defaults()  # as the entry points do, before jax starts a backend
import jax
index, count, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if count > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", count, index)
import jax.numpy as jnp
import numpy as np
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import fid_eval
from ddpm_jax.metrics import inception
from helpers import tiny_config
rng = np.random.default_rng(0)
real = rng.integers(0, 256, (14, 8, 8, 3), dtype=np.uint8)
samples = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)

w_pool = rng.normal(0.0, 1.0 / np.sqrt(192), (192, 2048)).astype(np.float32)
w_logits = rng.normal(0.0, 4.0 / np.sqrt(2048), (2048, 1008)).astype(np.float32)

@jax.jit
def features(images):
  pool3 = jnp.tanh(images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1) @ w_pool
  return {"pool3": pool3, "logits": pool3 @ w_logits}
inception.load_inception_params = lambda path: None
inception.make_inception_fn = lambda variables: features
fid_eval._FEATURE_BATCH = 4

def eval_iterator(config, split):
  start, stop = fid_eval.local_share(len(real))
  for i in range(start, stop, 4):
    rows = real[i:min(i + 4, stop)]
    image = np.concatenate([rows, np.zeros((4 - len(rows), 8, 8, 3), np.uint8)]) / 127.5 - 1
    yield {"image": image.astype(np.float32), "mask": np.arange(4) < len(rows)}
input_pipeline.create_eval_iterator = eval_iterator
config = tiny_config(**{"eval.metrics": ("fid",), "eval.fid_split": "test",
                        "eval.inception_weights": sys.argv[4], "eval.fid_stats_dir": sys.argv[5]})
result = fid_eval.fid_and_is(config, sys.argv[5], samples)
print("RESULT " + json.dumps(result))
# The per-host path: each process holds only its own samples, interleaved in blocks of 2 as a
# batch-sharded sampler leaves them (generation.draw_local_samples).
mine = np.arange(len(samples))[(np.arange(len(samples)) // 2) % count == index]
local = fid_eval.make_evaluator(config, sys.argv[5], ("fid",))(samples[mine], mine, len(samples))
print("LOCAL " + json.dumps(local))
"""


def _fid_results(tmp_path, num_processes: int, devices_per_process: int) -> list[dict]:
  port = portpicker.pick_unused_port()
  weights = tmp_path / "weights.npz"
  weights.write_bytes(b"random weights stand-in")  # hashed into the stats cache key only
  env = {**subprocess_env(devices_per_process),
         "PYTHONPATH": os.path.join(REPO_ROOT, "tests") + os.pathsep + REPO_ROOT}
  log_dir = tmp_path / f"fid_{num_processes}"
  commands = [[sys.executable, "-c", _FID_WORKER, str(i), str(num_processes), str(port),
               str(weights), str(log_dir / "stats")] for i in range(num_processes)]
  with spawned(commands, env, log_dir) as procs:
    codes = wait_all(procs, TIMEOUT_S)
    logs = [read_log(log_dir, i) for i in range(num_processes)]
  assert codes == [0] * num_processes, "\n\n".join(log[-4000:] for log in logs)
  return [{**json.loads(re.search(r"^RESULT (.*)$", log, re.M).group(1)),
           "local": json.loads(re.search(r"^LOCAL (.*)$", log, re.M).group(1))} for log in logs]


def test_fid_and_is_on_two_processes_equal_one_process(tmp_path):
  """Each process embeds only its share; the merged FID and IS match one process's."""
  (single,) = _fid_results(tmp_path, 1, 4)
  double = _fid_results(tmp_path, 2, 2)
  print(f"FID/IS, 1 process x 4 devices: {single['fid']!r} / {single['inception_score']!r}; "
        f"2 processes x 2 devices: {double[0]['fid']!r} / {double[0]['inception_score']!r}")
  assert double[0] == double[1]  # every process reports the same numbers
  assert single["fid_reference_examples"] == double[0]["fid_reference_examples"] == 14
  assert single["fid_num_samples"] == double[0]["fid_num_samples"] == 16
  for key in ("fid", "inception_score", "inception_score_std"):
    np.testing.assert_allclose(double[0][key], single[key], rtol=1e-4, err_msg=key)
    # Each process embedding only the samples it holds (not contiguous) gives the same numbers.
    np.testing.assert_allclose(double[0]["local"][key], single[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(single["local"][key], single[key], rtol=1e-6, err_msg=key)
  assert double[0]["local"] == double[1]["local"]
  assert single["fid"] > 0 and single["inception_score"] > 1.0


@pytest.mark.slow
def test_each_process_writes_only_its_own_samples(tmp_path):
  """--mode=sample on 2 processes x 2 devices: disjoint per-process shards whose union is
  bitwise the samples of 1 process x 4 devices (a model imported from random diffusers weights:
  no training needed)."""
  pytest.importorskip("diffusers")
  from configs import digits  # pylint: disable=g-import-not-at-top
  from ddpm_jax.interop import importer  # pylint: disable=g-import-not-at-top
  from tests import diffusers_reference  # pylint: disable=g-import-not-at-top
  unet = diffusers_reference.randomise(diffusers_reference.diffusers_unet(digits.get_config()))
  unet.save_pretrained(str(tmp_path / "src"))
  workdir = str(tmp_path / "W")
  importer.import_checkpoint(str(tmp_path / "src"), workdir, digits.get_config())
  flags = [sys.executable, "-m", "ddpm_jax.main", f"--config=configs/workdir.py:{workdir}",
           f"--workdir={workdir}", "--mode=sample", "--config.sampling.num_samples=10",
           "--config.sampling.batch_size=8", "--config.sampling.num_steps=4",
           "--config.sampling.trajectory_every=0"]
  one = subprocess.run(flags, env=subprocess_env(4), cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=TIMEOUT_S, check=False)
  assert one.returncode == 0, one.stderr[-3000:]
  port = portpicker.pick_unused_port()
  commands = [flags + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}"] for i in range(2)]
  with spawned(commands, subprocess_env(2), tmp_path / "logs") as procs:
    codes = wait_all(procs, TIMEOUT_S)
    logs = [read_log(tmp_path / "logs", i) for i in range(2)]
  assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
  out = os.path.join(workdir, "samples")
  with np.load(os.path.join(out, "dpm_solver_pp_sde_4_step0.npz")) as f:
    whole = f["samples"]
  shards = []
  for k in range(2):
    with np.load(os.path.join(out, f"dpm_solver_pp_sde_4_step0_process{k}of2.npz")) as f:
      shards.append((f["samples"], f["index"]))
  # Batch 0 (8 samples) is split 4/4, batch 1 (2 samples, padded to 4) 2/0.
  assert [list(i) for _, i in shards] == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]
  union = np.zeros_like(whole)
  for rows, index in shards:
    union[index] = rows
  np.testing.assert_array_equal(union, whole)


def _run_one_process(workdir, num_devices: int, **overrides) -> None:
  command = main_command(workdir, **{"training.log_every": 1, **overrides})
  result = subprocess.run(command, env=subprocess_env(num_devices),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_elastic_resume_on_other_topologies_matches_the_uninterrupted_run(tmp_path):
  """2 processes x 2 devices train to step 3; the run then finishes on 1 x 4 and on 1 x 2, and
  both match an uninterrupted 1 x 4 run: the data order and the iterator state are global."""
  steps = {"training.num_train_steps": 6, "training.checkpoint_every": 3}
  reference = tmp_path / "reference"
  _run_one_process(reference, 4, **steps)

  first = tmp_path / "first"
  commands = [main_command(first, f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={NUM_PROCESSES}", f"--process_id={index}",
                           **{**steps, "training.num_train_steps": 3, "training.log_every": 1})
              for port in [portpicker.pick_unused_port()] for index in range(NUM_PROCESSES)]
  env = subprocess_env(2)
  with spawned(commands, env, tmp_path / "logs") as procs:
    _finish(procs, tmp_path / "logs")
  # One topology-free iterator state, written by process 0.
  assert _data_state(first, 3)["position"] == 3

  config = tiny_config(**steps)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  want_params = flat(restore_state(config, reference).params)
  # Adam turns rounding-level gradients (of near-zero leaves) into lr-sized steps, so params are
  # compared as a whole: their distance to the reference, relative to the reference's own
  # movement over the resumed steps 3..6, is at the level of float rounding.
  moved = np.linalg.norm(want_params - flat(restore_state(config, reference, step=3).params))
  assert moved > 0
  want_losses = {m["step"]: m["loss"] for m in read_metrics(reference)}
  assert sorted(want_losses) == list(range(1, 7))
  for num_devices in (4, 2):
    workdir = tmp_path / f"resumed_{num_devices}"
    shutil.copytree(first, workdir)
    _run_one_process(workdir, num_devices, **steps)
    losses = {m["step"]: m["loss"] for m in read_metrics(workdir)}
    assert sorted(losses) == sorted(want_losses), num_devices
    np.testing.assert_allclose([losses[k] for k in sorted(losses)],
                               [want_losses[k] for k in sorted(losses)], rtol=1e-5,
                               err_msg=f"losses resumed on 1 x {num_devices}")
    state = restore_state(config, workdir)
    assert int(state.step) == 6
    distance = np.linalg.norm(flat(state.params) - want_params)
    assert distance < 1e-3 * moved, (num_devices, distance, moved)


@pytest.mark.slow
def test_a_sharded_state_on_two_processes_matches_one_process(tmp_path):
  """training.shard_state on 2 processes x 2 devices (each process holds the shards of its two
  devices, and writes them to the checkpoint) against the same run in this process on 4
  devices: the same per-device programs, so the same params to float rounding. With Adam's
  eps = 1 (an update of Lipschitz constant lr, see sharding_test.py) each of the 3 steps moves
  a param by at most lr 2 n eps32 min(G, clip), n = 512 terms per gradient entry."""
  from ddpm_jax.training import train  # pylint: disable=g-import-not-at-top
  steps = {"training.num_train_steps": 3, "training.checkpoint_every": 3,
           "training.shard_state": True, "optim.eps": 1.0, "optim.warmup_steps": 0,
           "optim.lr": 1e-3}
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(tiny_config(**steps), reference)
  workdir = tmp_path / "two"
  commands = [main_command(workdir, f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={NUM_PROCESSES}", f"--process_id={index}", **steps)
              for port in [portpicker.pick_unused_port()] for index in range(NUM_PROCESSES)]
  with spawned(commands, subprocess_env(2), tmp_path / "logs") as procs:
    _finish(procs, tmp_path / "logs")
  config = tiny_config(**steps)
  want, got = restore_state(config, reference), restore_state(config, workdir)
  assert int(got.step) == 3
  bound = 3 * 1e-3 * 2 * 512 * float(np.finfo(np.float32).eps) * config.optim.grad_clip
  for name in ("params", "ema_params"):
    for a, b in zip(jax.tree.leaves(getattr(got, name)), jax.tree.leaves(getattr(want, name))):
      np.testing.assert_allclose(a, b, rtol=0, atol=bound, err_msg=name)
