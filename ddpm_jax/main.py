"""Command line entry point: flags in, one call out.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 [--mode=train]
  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits --mode=sample
  python -m ddpm_jax.main --config=configs/digits.py --workdir=runs/digits --mode=eval

Any config field can be overridden, e.g. --config.diffusion.schedule=cosine; a misspelt key is
an error. On a multi-host TPU pod slice, run the same command on every worker.

This is the one place that changes the process: run as a program it sets the project's process
defaults (`runtime.process_env`), a SIGTERM handler (from the first line, since imports and the
compile take many seconds) and the console format. Importing it changes nothing, not even
absl's flags: `define_flags` defines them where the caller says.

Exit status: 0 when training finished (or there was nothing left to train), 75 (EX_TEMPFAIL,
`checkpointing.EXIT_PREEMPTED`) when a SIGTERM stopped training after saving its work, so a job
wrapper should run the same command again; 1 on an error.
"""

import functools
import os
import signal
import sys
import threading
import types

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "edit", "restore", "cascade")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None) -> types.SimpleNamespace:
  """Defines this program's flags on `flag_values`; returns their holders by name.

  Nothing is defined at import, so that any number of entry points can be imported into one
  process (a notebook, a script). To call `main` from Python:

    flag_values = flags.FlagValues()
    args = main.define_flags(flag_values, sys_argv=argv)
    main.main(flag_values(argv), args)

  Args:
    flag_values: where to define them (absl's global FLAGS for the program).
    sys_argv: the command line that config_flags reads `--config.KEY=VALUE` overrides from
      (default: sys.argv).
  """
  f = flag_values
  args = types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                             flag_values=f, lock_config=True, sys_argv=sys_argv),
      workdir=flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go here.",
                                  flag_values=f),
      mode=flags.DEFINE_enum(
          "mode", "train", list(MODES),
          "What to run (edit: inpainting / SDEdit; restore: zero-shot super-resolution, "
          "deblurring, inpainting, colourisation, denoising; cascade: a base run's samples "
          "through a super-resolution stage; see evaluation/drivers.py).", flag_values=f),
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", None,
          "host:port of process 0, for multi-process runs outside TPU pods (with "
          "--num_processes and --process_id). On a TPU pod, jax.distributed discovers the "
          "cluster by itself.", flag_values=f),
      num_processes=flags.DEFINE_integer("num_processes", None, "Processes in the job.",
                                         flag_values=f),
      process_id=flags.DEFINE_integer("process_id", None, "This process's index.",
                                      flag_values=f),
      multihost=flags.DEFINE_enum(
          "multihost", "auto", ["auto", "on", "off"],
          "Call jax.distributed.initialize(): 'auto' does when --coordinator_address is set or "
          "a multi-worker TPU pod slice is detected.", flag_values=f),
      platform=flags.DEFINE_enum(
          "platform", "auto", ["auto", "cpu", "gpu", "tpu"],
          "The devices to run on: 'auto' expects the accelerator this host has (a TPU VM, an "
          "NVIDIA GPU) and stops before anything compiles if JAX sees only CPUs (JAX installed "
          "without its plugin: pip install -e '.[tpu]' or '.[cuda12]'); 'gpu'/'tpu' require "
          "one; 'cpu' runs on the CPU whatever the host has.", flag_values=f),
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=f)
  return args

# Set by the SIGTERM handler that `run()` installs; the train loop turns it into a save and
# exit 75 (see checkpointing.PreemptionGuard). In-process callers of `main` get a fresh event.
_SIGTERM = threading.Event()


def _tpu_pod() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def init_distributed(args: types.SimpleNamespace) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  explicit = args.coordinator_address.value is not None
  multihost = args.multihost.value
  if multihost == "off" or (multihost == "auto" and not (explicit or _tpu_pod())):
    return
  if explicit:
    # CPU processes need a collectives backend for cross-process reductions (no-op elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator_address.value,
                             num_processes=args.num_processes.value,
                             process_id=args.process_id.value)


def check_backend(args: types.SimpleNamespace) -> None:
  """Stops (exit 1, with the install command) an accelerator run whose JAX has no accelerator."""
  from ddpm_jax.runtime import backend  # pylint: disable=g-import-not-at-top
  try:
    backend.check_plugin(args.platform.value)  # before jax.distributed looks for a TPU cluster
    init_distributed(args)
    import jax  # pylint: disable=g-import-not-at-top
    backend.check(args.platform.value, [d.platform for d in jax.devices()])
  except backend.BackendError as e:
    sys.exit(f"ddpm_jax: {e}")


def main(argv, args: types.SimpleNamespace):
  """Runs the parsed command line `argv` whose flags `define_flags` returned as `args`."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Importing jax does not start a backend; the console filter goes on before the backend check
  # starts one, so that the backends' probing (e.g. "Unable to initialize backend 'tpu'") stays
  # off the console.
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  check_backend(args)  # initialises jax.distributed too
  # Imported after jax.distributed so that nothing touches the backend before it is set up.
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.evaluation import drivers  # pylint: disable=g-import-not-at-top
  from ddpm_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import train  # pylint: disable=g-import-not-at-top

  config, workdir, mode = args.config.value, args.workdir.value, args.mode.value
  logging.info("Mode %s, workdir %s, process %d/%d.", mode, workdir, jax.process_index(),
               jax.process_count())
  if mode == "train":
    report = train.train_and_evaluate(config, workdir, sigterm=_SIGTERM)
    if report.get("preempted"):
      sys.exit(checkpointing.EXIT_PREEMPTED)
    return
  # Sampling and evaluation save nothing: SIGTERM ends them at once, with 128 + 15.
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  if _SIGTERM.is_set():
    sys.exit(128 + signal.SIGTERM)
  {"sample": drivers.sample, "eval": drivers.evaluate, "edit": drivers.edit,
   "restore": drivers.restore, "cascade": drivers.cascade}[mode](config, workdir)


def run() -> None:
  """The program: process defaults, the SIGTERM flag, then flags and `main`."""
  signal.signal(signal.SIGTERM, lambda *_: _SIGTERM.set())
  from ddpm_jax.runtime import process_env  # pylint: disable=g-import-not-at-top
  process_env.set_defaults()
  args = define_flags()
  app.run(functools.partial(main, args=args))


if __name__ == "__main__":
  run()
