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

Sweep files are data: they import nothing from the runner, so reading one never starts JAX.
"""
