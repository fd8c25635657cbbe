"""Command line entry point: flags in, one call out.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 [--mode=train]
  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits --mode=sample
  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits --mode=eval

Any config field can be overridden, e.g. --config.diffusion.schedule=cosine; a misspelt key is
an error. On a multi-host TPU pod slice, run the same command on every worker.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for multi-process runs outside TPU pods (with --num_processes and "
    "--process_id). On a TPU pod, jax.distributed discovers the cluster by itself.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MULTIHOST = flags.DEFINE_enum(
    "multihost", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when --coordinator_address is set or a "
    "multi-worker TPU pod slice is detected.")

flags.mark_flags_as_required(["config", "workdir"])


def _tpu_pod() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def init_distributed() -> None:
  explicit = _COORDINATOR.value is not None
  if _MULTIHOST.value == "off" or (_MULTIHOST.value == "auto" and not (explicit or _tpu_pod())):
    return
  if explicit:
    # CPU processes need a collectives backend for cross-process reductions (no-op elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  init_distributed()
  # Imported after jax.distributed so that nothing touches the backend before it is set up.
  from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.info("Mode %s, workdir %s, process %d/%d.", _MODE.value, workdir, jax.process_index(),
               jax.process_count())
  if _MODE.value == "train":
    train.train_and_evaluate(config, workdir)
  elif _MODE.value == "sample":
    evaluate.sample(config, workdir)
  else:
    evaluate.evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
