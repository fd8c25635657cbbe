"""Runs an ablation sweep: each point a subprocess with its own named, resumable workdir.

  python -m experiments.sweep --sweep=digits_schedules [--grid=full] [--root=runs/sweeps]
      [--dry-run] [--launch=local|tpu] [--only=SUBSTR] [--collate-only] [--out=experiments/results]

This module is the command line and the public API; the work is split by what each part owns:

  experiments/points.py   what a sweep is: definitions, expansion into points, validation of
                          every point's config and command line before anything runs;
  experiments/launch.py   where a point runs: workdirs, command lines, the local subprocess
                          (output appended to <workdir>/train.log) or a TPU pod's gcloud line;
  experiments/runner.py   running the points in turn, done/failed markers, resumption;
  experiments/collate.py  the results table and plots.

A training sweep runs each point as `python -m ddpm_jax.main --config=<base> --workdir=... \
--config.k=v ...`; a sample-only sweep (a definition with `checkpoint`, e.g. digits_samplers)
trains nothing and runs each point as `--mode=eval` on the one shared checkpoint.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import signal
import sys

from experiments import collate  # noqa: F401  (re-exported for callers of this module)
from experiments.launch import LOG_FILE  # noqa: F401
from experiments.launch import launch_point  # noqa: F401
from experiments.launch import link_checkpoint  # noqa: F401
from experiments.launch import point_command  # noqa: F401
from experiments.launch import point_workdir  # noqa: F401
from experiments.launch import shell_join  # noqa: F401
from experiments.launch import tpu_command  # noqa: F401
from experiments.points import REPO_ROOT  # noqa: F401
from experiments.points import Plan  # noqa: F401
from experiments.points import Point  # noqa: F401
from experiments.points import Sweep  # noqa: F401
from experiments.points import SweepError  # noqa: F401
from experiments.points import _module_from_file  # noqa: F401
from experiments.points import apply_overrides  # noqa: F401
from experiments.points import as_sweep  # noqa: F401
from experiments.points import cli_value  # noqa: F401
from experiments.points import config_from_args  # noqa: F401
from experiments.points import expand  # noqa: F401
from experiments.points import load_sweep  # noqa: F401
from experiments.points import plan  # noqa: F401
from experiments.runner import DEFAULT_OUT  # noqa: F401
from experiments.runner import DEFAULT_ROOT  # noqa: F401
from experiments.runner import DONE_MARKER  # noqa: F401
from experiments.runner import FAILED_MARKER  # noqa: F401
from experiments.runner import collate_sweep  # noqa: F401
from experiments.runner import run_sweep  # noqa: F401
from experiments.runner import unfinished  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
  """The command line's flags."""
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
  parser.add_argument("--checkpoint", default=None,
                      help="sample-only sweeps: the trained run to evaluate, instead of the "
                           "definition's")
  return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (2: invalid sweep, 1: a point failed)."""
  args = parse_args(argv)
  try:
    sweep = load_sweep(args.sweep, args.grid)
    if args.checkpoint is not None:
      if not sweep.checkpoint:
        raise SweepError(f"--checkpoint: sweep {sweep.name!r} trains its points; only a "
                         "sample-only sweep evaluates a given checkpoint.")
      sweep = as_sweep(dataclasses.replace(sweep, checkpoint=args.checkpoint))
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

