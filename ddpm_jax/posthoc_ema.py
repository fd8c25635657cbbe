"""Entry point: the post-hoc EMA of any sigma_rel from a run's snapshots (EDM2, Karras et al. 2024).

A run trained with --config.training.phema_sigma_rels='(0.05, 0.10)' saves its tracked EMAs to
<workdir>/phema every training.phema_snapshot_every steps (`training.posthoc_ema_io` does the
work). This rebuilds the EMA of another relative width at a snapshot step and writes it as a
new, params-only workdir:

  python -m ddpm_jax.posthoc_ema --workdir=runs/digits_phema --list
  python -m ddpm_jax.posthoc_ema --workdir=runs/digits_phema --sigma_rel=0.08 \\
      --out=runs/digits_phema_s008                 # at the newest snapshot (--step=S: another)

Then: python -m ddpm_jax.main --config=configs/workdir.py:OUT --workdir=OUT --mode=sample|eval
"""

from absl import app
from absl import flags

from ddpm_jax.runtime import process_env

_WORKDIR = flags.DEFINE_string("workdir", None, "The run (trained with "
                               "training.phema_sigma_rels) whose snapshots to read.")
_SIGMA_REL = flags.DEFINE_float("sigma_rel", None, "Relative width of the EMA to build, in "
                                "(0, 0.2886] (EDM2: about 0.05 to 0.15).")
_STEP = flags.DEFINE_integer("step", None, "A snapshot step (default: the newest); every "
                             "snapshot up to it is used.")
_OUT = flags.DEFINE_string("out", None, "New workdir to write (params-only checkpoint + the "
                           "run's config.json).")
_USE = flags.DEFINE_list("use_sigma_rels", None, "Combine only the tracked EMAs of these "
                         "sigma_rels (default: all).")
_LIST = flags.DEFINE_bool("list", False, "Only list the run's snapshots.")

flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from ddpm_jax.runtime import logging_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import posthoc_ema_io  # pylint: disable=g-import-not-at-top
  logging_lib.setup_console()
  snapshots = posthoc_ema_io.list_snapshots(_WORKDIR.value)
  if _LIST.value:
    if not snapshots:
      raise app.UsageError(f"No post-hoc EMA snapshots in "
                           f"{posthoc_ema_io.snapshot_dir(_WORKDIR.value)}.")
    print(f"{len(snapshots)} snapshots in {posthoc_ema_io.snapshot_dir(_WORKDIR.value)}:")
    print(posthoc_ema_io.format_table(snapshots))
    return
  if _SIGMA_REL.value is None or _OUT.value is None:
    raise app.UsageError("Pass --sigma_rel and --out (or --list).")
  use = None if _USE.value is None else [float(s) for s in _USE.value]
  record = posthoc_ema_io.write_reconstruction(_WORKDIR.value, _OUT.value, _SIGMA_REL.value,
                                               step=_STEP.value, use_sigma_rels=use)
  files = len({s["step"] for s in record["sources"]})
  print(f"Rebuilt the EMA of sigma_rel {record['sigma_rel']:g} (gamma {record['gamma']:.3f}) at "
        f"step {record['step']} of {_WORKDIR.value} from {len(record['sources'])} tracked EMAs "
        f"in {files} snapshots (steps {record['sources'][0]['step']}..{record['step']}): "
        f"{len(record['sources'])} coefficients, {record['params']:,} parameters.")
  print(f"Wrote {_OUT.value}. Sample: python -m ddpm_jax.main "
        f"--config=configs/workdir.py:{_OUT.value} --workdir={_OUT.value} --mode=sample")


if __name__ == "__main__":
  process_env.set_defaults()
  app.run(main)
