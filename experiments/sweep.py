"""Runs an ablation sweep: each point a training subprocess with its own named, resumable workdir.

  python -m experiments.sweep --sweep=digits_schedules [--grid=full] [--root=runs/sweeps]
      [--dry-run] [--launch=local|tpu] [--only=SUBSTR] [--collate-only] [--out=experiments/results]

A sweep (format in experiments/sweeps/__init__.py) is a base config, fixed overrides, a grid
and/or explicit points. Before anything runs, every point's overrides are applied to the locked
base config (an unknown key fails, naming the key and the point), checked with
`config_lib.validate_config`, and parsed back through `ml_collections.config_flags` from the
exact command-line arguments the subprocess will get. Points then run one after another as

  python -m ddpm_jax.main --config=<base> --workdir=<root>/<sweep>/<point> --config.k=v ...

with their output appended to <workdir>/train.log. A point whose subprocess exits 0 gets a
`sweep_done.json` marker and is skipped from then on; any other point is simply run again and
`train_and_evaluate` resumes it from its newest checkpoint. The results table and plots
(`experiments.collate`) are written at the end, or alone with --collate-only.
"""

import argparse
from collections.abc import Mapping, Sequence
import dataclasses
import difflib
import importlib
import importlib.util
import itertools
import json
import os
import posixpath
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any
import warnings

from absl import flags
import ml_collections
from ml_collections import config_flags

from ddpm_jax import config_lib
from experiments import collate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = "runs/sweeps"
DEFAULT_OUT = "experiments/results"
DONE_MARKER = collate.DONE_MARKER
FAILED_MARKER = collate.FAILED_MARKER
LOG_FILE = "train.log"
TPU_REPO_DIR = "~/ddpm_jax"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._,+=-]")
_UNSAFE_SHELL = re.compile(r"[^\w@%+=:,./-]", re.ASCII)
_MAX_NAME = 200  # path components are limited to 255 bytes


class SweepError(ValueError):
  """A sweep that cannot run as defined; raised before any point starts."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep definition; the fields are described in experiments/sweeps/__init__.py."""
  name: str
  config: str
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  points: Sequence[Mapping[str, Any]] = ()


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    name: filesystem-safe, from the labels: 'schedule-cosine__num_timesteps-1000__loss-mse'.
    labels: {axis alias: value label}, the point's columns in the results table.
    overrides: every dotted override of the run, the sweep's fixed ones first.
  """
  name: str
  labels: Mapping[str, str]
  overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated point: its full config and the `--config.k=v` arguments that rebuild it."""
  point: Point
  config: ml_collections.ConfigDict
  args: tuple[str, ...]


def as_sweep(sweep: Sweep | Mapping[str, Any]) -> Sweep:
  if not isinstance(sweep, Sweep):
    try:
      sweep = Sweep(**sweep)
    except TypeError as e:
      raise SweepError(f"Bad sweep definition: {e}.") from None
  if not sweep.name or _UNSAFE_NAME.search(sweep.name):
    raise SweepError(f"Sweep name {sweep.name!r} must be non-empty and filesystem-safe.")
  return sweep


def _module_from_file(path: str, name: str):
  module_spec = importlib.util.spec_from_file_location(name, path)
  if not os.path.isfile(path) or module_spec is None:
    raise SweepError(f"No such file: {path}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_sweep(spec: str, grid: str | None = None) -> Sweep:
  """Calls `get_sweep([grid])` of a module in experiments/sweeps, a dotted module or a .py file."""
  if spec.endswith(".py") or os.sep in spec:
    module = _module_from_file(os.path.abspath(spec), "sweep_definition")
  else:
    name = spec if "." in spec else f"experiments.sweeps.{spec}"
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      shipped = sorted(f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "experiments", "sweeps"))
                       if f.endswith(".py") and not f.startswith("_"))
      raise SweepError(f"Unknown sweep {spec!r}; shipped sweeps: {shipped}.") from None
  try:
    return as_sweep(module.get_sweep() if grid is None else module.get_sweep(grid))
  except (TypeError, ValueError) as e:
    raise SweepError(f"{spec}: get_sweep({'' if grid is None else repr(grid)}): {e}") from None


def _label(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    value = ",".join(str(v) for v in value) or "none"
  return _UNSAFE_NAME.sub("_", str(value))


def _aliases(keys: Sequence[str]) -> dict[str, str]:
  """The last component of each dotted key, or the whole key where two would collide."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: _label(s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _axis_choice(axis: str, value: Any) -> tuple[str, dict[str, Any]]:
  """(label, overrides) of one grid value: a plain value of `axis`, or a dict of linked ones."""
  if not isinstance(value, Mapping):
    return _label(value), {axis: value}
  overrides = {k: v for k, v in value.items() if k != "label"}
  if not overrides or ("label" not in value and axis not in overrides):
    raise SweepError(f"Grid axis {axis!r}: a dict value needs overrides and a 'label' (or the "
                     f"axis key itself); got {dict(value)!r}.")
  return _label(value.get("label", overrides.get(axis))), overrides


def _name(labels: Mapping[str, str]) -> str:
  return "__".join(f"{k}-{v}" for k, v in labels.items()) or "base"


def expand(sweep: Sweep | Mapping[str, Any]) -> list[Point]:
  """The grid's points (product in axis order, last axis fastest), then the explicit ones."""
  sweep = as_sweep(sweep)
  points = []
  axes = list(sweep.grid)
  alias = _aliases(axes)
  choices = [[_axis_choice(a, v) for v in sweep.grid[a]] for a in axes]
  for combo in itertools.product(*choices) if axes else ():
    overrides = dict(sweep.fixed)
    for _, own in combo:
      overrides.update(own)
    labels = {alias[a]: label for a, (label, _) in zip(axes, combo)}
    points.append(Point(_name(labels), labels, overrides))
  for spec in sweep.points:
    own = {k: v for k, v in spec.items() if k != "name"}
    alias = _aliases(list(own))
    labels = {alias[k]: _label(v) for k, v in own.items()}
    name = _label(spec["name"]) if "name" in spec else _name(labels)
    points.append(Point(name, labels, {**sweep.fixed, **own}))
  if not points:
    raise SweepError(f"Sweep {sweep.name!r} defines no points.")
  names = [p.name for p in points]
  for name in names:
    if names.count(name) > 1:
      raise SweepError(f"Sweep {sweep.name!r}: two points are both named {name!r}; give linked "
                       "values distinct labels or explicit points a 'name'.")
    if len(name) > _MAX_NAME:
      raise SweepError(f"Sweep {sweep.name!r}: point name {name!r} is too long for a directory; "
                       "shorten the labels or give the point a 'name'.")
  return points


def _config_file(path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def cli_value(value: Any, default: Any) -> str:
  """`value` as config_flags must read it for a field whose base value is `default`."""
  if isinstance(default, bool):
    return "true" if value else "false"
  if isinstance(default, str):
    return str(value)  # absl's string parser keeps the text as it is
  if isinstance(default, tuple):
    return repr(tuple(value))  # TupleParser: ast.literal_eval, e.g. "('digits_score', 'bpd')"
  return repr(value)  # int/float parsers, or ast.literal_eval for fields that default to None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> tuple[str, ...]:
  """Sets each dotted key of a locked `config`; returns the matching `--config.k=v` arguments."""
  args = []
  for key, value in overrides.items():
    node, path = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        raise SweepError(f"{where}: unknown config key {key!r}; {'.'.join(path)} is a field.")
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        valid = sorted(".".join(path + [k]) for k in node.keys())
        raise SweepError(f"{where}: unknown config key {key!r}"
                         + (f" (did you mean {'.'.join(path + close)!r}?)" if close else "")
                         + f"; valid keys: {valid}.")
      parent, node, path = node, node[part], path + [part]
    if isinstance(node, ml_collections.ConfigDict):
      raise SweepError(f"{where}: {key!r} is a group of the config, not a field.")
    if isinstance(node, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      parent[path[-1]] = value
    except (TypeError, ValueError, AttributeError) as e:
      raise SweepError(f"{where}: cannot set {key}={value!r}: {e}") from None
    args.append(f"--config.{key}={cli_value(parent[path[-1]], node)}")
  return tuple(args)


def config_from_args(config_path: str, args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `python -m ddpm_jax.main --config=config_path *args` would build."""
  argv = ["main", f"--config={_config_file(config_path)}", *args]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  with warnings.catch_warnings():  # config_flags loads the file with a deprecated importlib API
    warnings.simplefilter("ignore", DeprecationWarning)
    flag_values(argv)
  return holder.value


def plan(sweep: Sweep, points: Sequence[Point]) -> list[Plan]:
  """Validates every point (see the module docstring); any problem raises `SweepError`."""
  module = _module_from_file(_config_file(sweep.config), "sweep_base_config")
  plans = []
  for point in points:
    where = f"sweep {sweep.name!r}, point {point.name!r}"
    config = module.get_config()
    config.lock()
    args = apply_overrides(config, point.overrides, where)
    try:
      config_lib.validate_config(config, check_data=False)
      parsed = config_from_args(sweep.config, args)
    except (ValueError, flags.Error) as e:
      raise SweepError(f"{where}: {e}") from None
    diff = config_lib.config_diff(parsed, config)
    if diff:
      raise SweepError(f"{where}: the command line would not rebuild the config: {diff}.")
    plans.append(Plan(point, config, args))
  return plans


def point_workdir(root: str, sweep: Sweep, point: Point, *, local: bool = True) -> str:
  if "://" in root:
    return posixpath.join(root, sweep.name, point.name)
  return os.path.join(os.path.abspath(root) if local else root, sweep.name, point.name)


def train_command(sweep: Sweep, plan_: Plan, workdir: str, python: str = "python") -> list[str]:
  return [python, "-m", "ddpm_jax.main", f"--config={sweep.config}", f"--workdir={workdir}",
          *plan_.args]


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


def unfinished(workdir: str, config: ml_collections.ConfigDict) -> str | None:
  """Why a run is not finished, or None. (On SIGTERM train.py saves and exits 0 early.)"""
  records = collate.read_metrics(workdir)
  step, target = (records[-1]["step"] if records else 0), config.training.num_train_steps
  if step < target:
    return f"stopped at step {step} of {target}"
  if (config.training.final_eval_metrics
      and not os.path.exists(os.path.join(workdir, "eval", f"step_{target}.json"))):
    return "no final evaluation"
  return None


def _run_point(command: list[str], workdir: str, plan_: Plan, echo: bool) -> str | None:
  """Runs a point and marks its workdir; returns why it did not finish, or None."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  rc = launch_point(command, workdir, echo=echo)
  problem = f"exit status {rc}" if rc else unfinished(workdir, plan_.config)
  record = {"returncode": rc, "problem": problem, "seconds": round(time.time() - start, 1),
            "finished": time.time(), "command": command, "overrides": dict(plan_.point.overrides)}
  done, failed = os.path.join(workdir, DONE_MARKER), os.path.join(workdir, FAILED_MARKER)
  with open(failed if problem else done, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, default=str)
  if not problem and os.path.exists(failed):
    os.remove(failed)
  return problem


def collate_sweep(sweep: Sweep, plans: Sequence[Plan], root: str, out: str) -> list[str]:
  if "://" in root:
    raise SweepError(f"Collation reads local files; copy {root} here first (gsutil -m rsync -r).")
  entries = []
  for p in plans:
    workdir = point_workdir(root, sweep, p.point)
    entries.append(collate.Entry(p.point.name, p.point.labels, workdir, p.config))
  paths = collate.collate(sweep.name, sweep.config, sweep.fixed, entries, out)
  print(f"Results: {', '.join(paths)}")
  return paths


def run_sweep(sweep: Sweep | Mapping[str, Any], *, root: str = DEFAULT_ROOT,
              out: str = DEFAULT_OUT, only: Sequence[str] = (), dry_run: bool = False,
              launch: str = "local", collate_only: bool = False, tpu_name: str = "$TPU_NAME",
              zone: str = "$ZONE", echo: bool = True) -> list[str]:
  """Validates every point, then lists, prints, runs and/or collates them (see `main`).

  Returns:
    The names of the points run in this call that did not finish.
  """
  sweep = as_sweep(sweep)
  plans = plan(sweep, expand(sweep))
  if collate_only:
    collate_sweep(sweep, plans, root, out)
    return []
  selected = [p for p in plans if not only or any(s in p.point.name for s in only)]
  if not selected:
    raise SweepError(f"--only={list(only)} matches none of {[p.point.name for p in plans]}.")
  if launch == "tpu":
    if "://" not in root:
      print(f"# Warning: --root={root} is not a bucket; multi-host checkpoints need a workdir "
            "every worker shares, e.g. --root=gs://BUCKET/sweeps.", file=sys.stderr)
    for p in selected:
      command = train_command(sweep, p, point_workdir(root, sweep, p.point, local=False))
      print(f"# {p.point.name}\n{tpu_command(command, tpu_name, zone)}")
    return []
  if launch != "local":
    raise SweepError(f"Unknown --launch={launch!r}; valid: ['local', 'tpu'].")
  if "://" in root:
    raise SweepError(f"--launch=local needs a local --root, not {root}.")
  print(f"Sweep {sweep.name}: {len(selected)} of {len(plans)} points, base {sweep.config}; "
        f"commands run from {REPO_ROOT}.")
  failed = []
  for i, p in enumerate(selected):
    workdir = point_workdir(root, sweep, p.point)
    status = collate.point_status(workdir)
    command = train_command(sweep, p, workdir)
    if dry_run:
      print(f"[{status}] {p.point.name}\n  {shell_join(command)}")
      continue
    if status == "done":
      print(f"[{i + 1}/{len(selected)}] {p.point.name}: done, skipped.")
      continue
    print(f"[{i + 1}/{len(selected)}] {p.point.name} ({status}); log: "
          f"{os.path.join(workdir, LOG_FILE)}", flush=True)
    problem = _run_point([sys.executable, *command[1:]], workdir, p, echo)
    if problem:
      failed.append(p.point.name)
      print(f"[{i + 1}/{len(selected)}] {p.point.name} FAILED ({problem}); see "
            f"{os.path.join(workdir, LOG_FILE)}", flush=True)
  if not dry_run:
    collate_sweep(sweep, plans, root, out)
    if failed:
      print(f"{len(failed)} point(s) failed: {failed}", file=sys.stderr)
  return failed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", required=True,
                      help="a name in experiments/sweeps, a dotted module path or a .py file")
  parser.add_argument("--grid", default=None, help="passed to get_sweep() (e.g. 'full')")
  parser.add_argument("--root", default=DEFAULT_ROOT, help="workdirs go to ROOT/<sweep>/<point>")
  parser.add_argument("--out", default=DEFAULT_OUT, help="results table and plots go here")
  parser.add_argument("--only", action="append", default=[],
                      help="run only points whose name contains this (repeatable)")
  parser.add_argument("--launch", choices=("local", "tpu"), default="local")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="list points, their status and commands; run nothing")
  parser.add_argument("--collate-only", "--collate_only", dest="collate_only",
                      action="store_true", help="only write the results table and plots")
  parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output")
  parser.add_argument("--tpu-name", "--tpu_name", dest="tpu_name", default="$TPU_NAME")
  parser.add_argument("--zone", default="$ZONE")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (2: invalid sweep, 1: a point failed)."""
  args = parse_args(argv)
  try:
    sweep = load_sweep(args.sweep, args.grid)
    failed = run_sweep(sweep, root=args.root, out=args.out, only=args.only,
                       dry_run=args.dry_run, launch=args.launch, collate_only=args.collate_only,
                       tpu_name=args.tpu_name, zone=args.zone, echo=not args.quiet)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("Interrupted; the same command resumes the sweep.", file=sys.stderr)
    return 130
  return 1 if failed else 0


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt  # so that a SIGTERM, too, reaches the running point as a SIGTERM


if __name__ == "__main__":
  import jax  # pylint: disable=g-import-not-at-top
  # This process only checks configs: keep it off the accelerators, whose memory the training
  # subprocesses need (its device count is then 1, so they re-check batch divisibility).
  jax.config.update("jax_platforms", "cpu")
  signal.signal(signal.SIGTERM, _interrupt)
  sys.exit(main())
