"""Sweep definitions: each module's `get_sweep(grid=...)` returns a plain dict.

The dict holds the fields of `experiments.sweep.Sweep`:

  name:   directory of the sweep under --root, and the stem of its results files.
  config: base config file, relative to the repository root (e.g. 'configs/digits.py').
  fixed:  {dotted key: value} applied to every point (e.g. a shorter training budget).
  grid:   {axis: [value, ...]} expanded as a product, in order. An axis is a dotted config key
          and each value a plain override, or a value is a dict of linked overrides with a
          'label', e.g. {'label': 'hybrid', 'diffusion.loss': 'hybrid',
          'diffusion.model_var': 'learned_range'}.
  points: [{dotted key: value, ...}, ...] explicit points, added after the grid's; an optional
          'name' key names the point.
  checkpoint: optional; a trained run's workdir. The sweep is then sample-only: nothing trains,
          and every point runs `--mode=eval` on that run's checkpoints (linked into the point's
          own workdir, so each report lands in <point>/eval/). `--checkpoint=DIR` replaces it.
  plot:   optional line plot {'x': key, 'y': key, 'series': label key, 'floor': key,
          'logx': bool, 'title': str}; keys are eval-report keys or point labels. It is written
          as <name>_lines.png.

Sweep files are data: they import nothing from the runner, so reading one never starts JAX.
"""
