"""Entry point: the post-hoc EMA of any sigma_rel from a run's snapshots (EDM2, Karras et al. 2024).

A run trained with --config.training.phema_sigma_rels='(0.05, 0.10)' saves its tracked EMAs to
<workdir>/phema every training.phema_snapshot_every steps (`training.posthoc_ema_io` does the
work). This rebuilds the EMA of another relative width at a snapshot step and writes it as a
new, params-only workdir:

  python -m ddpm_jax.posthoc_ema --workdir=runs/digits_phema --list
  python -m ddpm_jax.posthoc_ema --workdir=runs/digits_phema --sigma_rel=0.08 \\
      --out=runs/digits_phema_s008                 # at the newest snapshot (--step=S: another)

From Python, call `training.posthoc_ema_io.write_reconstruction(workdir, out, sigma_rel)`, the
function behind it.

Then: python -m ddpm_jax.main --config=configs/workdir.py:OUT --workdir=OUT --mode=sample|eval
"""

import functools
import types

from absl import app
from absl import flags

from ddpm_jax.runtime import process_env


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> types.SimpleNamespace:
  """Defines this program's flags on `flag_values` (nothing is defined at import)."""
  f = flag_values
  args = types.SimpleNamespace(
      workdir=flags.DEFINE_string("workdir", None, "The run (trained with "
                                  "training.phema_sigma_rels) whose snapshots to read.",
                                  flag_values=f),
      sigma_rel=flags.DEFINE_float("sigma_rel", None, "Relative width of the EMA to build, in "
                                   "(0, 0.2886] (EDM2: about 0.05 to 0.15).", flag_values=f),
      step=flags.DEFINE_integer("step", None, "A snapshot step (default: the newest); every "
                                "snapshot up to it is used.", flag_values=f),
      out=flags.DEFINE_string("out", None, "New workdir to write (params-only checkpoint + the "
                              "run's config.json).", flag_values=f),
      use_sigma_rels=flags.DEFINE_list("use_sigma_rels", None, "Combine only the tracked EMAs "
                                       "of these sigma_rels (default: all).", flag_values=f),
      list=flags.DEFINE_bool("list", False, "Only list the run's snapshots.", flag_values=f),
      allow_extrapolation=flags.DEFINE_bool(
          "allow_extrapolation", False, "Build a --sigma_rel outside the tracked widths anyway "
          "(an extrapolation: the run warns with the coefficients it used).", flag_values=f),
  )
  flags.mark_flags_as_required(["workdir"], flag_values=f)
  return args


def main(argv, args: types.SimpleNamespace):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import posthoc_ema_io  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  snapshots = posthoc_ema_io.list_snapshots(args.workdir.value)
  if args.list.value:
    if not snapshots:
      raise app.UsageError(f"No post-hoc EMA snapshots in "
                           f"{posthoc_ema_io.snapshot_dir(args.workdir.value)}.")
    print(f"{len(snapshots)} snapshots in {posthoc_ema_io.snapshot_dir(args.workdir.value)}:")
    print(posthoc_ema_io.format_table(snapshots))
    return
  if args.sigma_rel.value is None or args.out.value is None:
    raise app.UsageError("Pass --sigma_rel and --out (or --list).")
  use = args.use_sigma_rels.value
  use = None if use is None else [float(s) for s in use]
  record = posthoc_ema_io.write_reconstruction(args.workdir.value, args.out.value,
                                               args.sigma_rel.value, step=args.step.value,
                                               use_sigma_rels=use,
                                               allow_extrapolation=args.allow_extrapolation.value)
  files = len({s["step"] for s in record["sources"]})
  print(f"Rebuilt the EMA of sigma_rel {record['sigma_rel']:g} (gamma {record['gamma']:.3f}) at "
        f"step {record['step']} of {args.workdir.value} from {len(record['sources'])} tracked EMAs "
        f"in {files} snapshots (steps {record['sources'][0]['step']}..{record['step']}): "
        f"{len(record['sources'])} coefficients, {record['params']:,} parameters.")
  print(f"Wrote {args.out.value}. Sample: python -m ddpm_jax.main "
        f"--config=configs/workdir.py:{args.out.value} --workdir={args.out.value} --mode=sample")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(functools.partial(main, args=define_flags()))
