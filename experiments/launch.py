"""Where a point runs: its workdir, its command line, and the subprocess (local or a TPU pod).

Points run one after another as

  python -m ddpm_jax.main --config=<base> --workdir=<root>/<sweep>/<point> --config.k=v ...

(`--mode=eval` for a sample-only sweep) from the repository root, with their output appended to
<workdir>/train.log. `--launch=tpu` prints one gcloud line per point instead.
"""

from collections.abc import Sequence
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile
import time

from etils import epath

from experiments.points import REPO_ROOT
from experiments.points import Plan
from experiments.points import Point
from experiments.points import Sweep

LOG_FILE = "train.log"
TPU_REPO_DIR = "~/ddpm_jax"
_UNSAFE_SHELL = re.compile(r"[^\w@%+=:,./-]", re.ASCII)


def point_workdir(root: str, sweep: Sweep, point: Point, *, local: bool = True) -> str:
  if "://" in root:
    return posixpath.join(root, sweep.name, point.name)
  return os.path.join(os.path.abspath(root) if local else root, sweep.name, point.name)


def point_command(sweep: Sweep, plan_: Plan, workdir: str, python: str = "python") -> list[str]:
  """`python -m ddpm_jax.main ...` of a point: training, or `--mode=eval` (a sample-only sweep)."""
  mode = ["--mode=eval"] if sweep.checkpoint else []
  return [python, "-m", "ddpm_jax.main", *mode, f"--config={sweep.config}",
          f"--workdir={workdir}", *plan_.args]


def checkpoint_dir(run: str) -> str:
  """The checkpoints folder of a trained run's workdir, relative paths from the repository root."""
  run = run if os.path.isabs(run) else os.path.join(REPO_ROOT, run)
  return os.path.join(run, "checkpoints")


def link_checkpoint(run: str, workdir: str) -> None:
  """Makes `workdir/checkpoints` a symlink to the shared run's checkpoints (read, never written).

  `--mode=eval` then loads the shared params but writes its report to `workdir/eval/`.
  """
  target, link = checkpoint_dir(run), os.path.join(workdir, "checkpoints")
  if os.path.islink(link) and os.readlink(link) == target:
    return
  if os.path.lexists(link):
    raise FileExistsError(f"{link} exists and is not a link to {target}; remove it to rerun "
                          "this point on the shared checkpoint.")
  os.symlink(target, link, target_is_directory=True)


def _quote(word: str) -> str:
  """Shell quoting that keeps `--config.k="('a', 'b')"` readable."""
  if not _UNSAFE_SHELL.search(word):
    return word
  flag, eq, value = word.partition("=")
  if not eq or _UNSAFE_SHELL.search(flag):
    flag, value = "", word
  quoted = f'"{value}"' if not re.search(r'["\\$`!]', value) else shlex.quote(value)
  return f"{flag}={quoted}" if flag else quoted


def shell_join(argv: Sequence[str]) -> str:
  return " ".join(_quote(a) for a in argv)


def tpu_command(command: Sequence[str], tpu_name: str, zone: str) -> str:
  """One gcloud line that runs `command` on every worker of a TPU pod slice."""
  # --multihost=on: every worker joins jax.distributed (a TPU VM slice has no env to detect).
  inner = f"cd {TPU_REPO_DIR} && {shell_join([*command, '--multihost=on'])}"
  inner = re.sub(r'([\\"$`])', r"\\\1", inner)
  return (f"gcloud compute tpus tpu-vm ssh {tpu_name} --zone={zone} --worker=all "
          f'--command="{inner}"')


def launch_point(command: Sequence[str], workdir: str, echo: bool = True) -> int:
  """Runs one point's subprocess from the repository root, appending its output to train.log."""
  if "://" in workdir:  # object stores have no append: log here, then replace the whole object
    remote = epath.Path(workdir) / LOG_FILE
    with tempfile.TemporaryDirectory() as local:
      if remote.exists():
        (epath.Path(local) / LOG_FILE).write_text(remote.read_text())
      try:
        return launch_point(command, local, echo)
      finally:
        remote.parent.mkdir(parents=True, exist_ok=True)
        remote.write_text((epath.Path(local) / LOG_FILE).read_text())
  os.makedirs(workdir, exist_ok=True)
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  with open(os.path.join(workdir, LOG_FILE), "a", encoding="utf-8") as log:
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shell_join(command)}\n")
    log.flush()
    # A session of its own: Ctrl-C reaches only the runner, which then sends SIGTERM, on which
    # train.py saves a checkpoint before it exits.
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    def drain() -> int:
      for line in proc.stdout:
        log.write(line)
        if echo:
          sys.stdout.write(line)
      return proc.wait()

    try:
      return drain()
    except KeyboardInterrupt:
      proc.terminate()
      drain()  # the run's checkpoint and exit go to the log too
      raise
