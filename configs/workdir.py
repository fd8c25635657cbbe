"""The config a workdir records (its config.json): for imported models and finished runs.

  python -m ddpm_jax.main --config=configs/workdir.py:runs/ddpm_cifar10 \\
      --workdir=runs/ddpm_cifar10 --mode=sample --config.sampling.sampler=ddim \\
      --config.sampling.num_steps=100

Any field can still be overridden with --config.KEY=VALUE.
"""

import ml_collections

from configs import base
from ddpm_jax.runtime import run_config


def get_config(workdir: str):
  config = run_config.load(workdir)
  if config is None:
    raise FileNotFoundError(f"{workdir}/config.json does not exist: not a ddpm_jax workdir (or "
                            "an import that did not finish).")
  # JSON has no tuples: give back the tuple fields of configs/base.py their type.
  defaults, fields = base.get_config(), config.to_dict()
  for section, values in fields.items():
    for key, value in values.items() if section in defaults else ():
      if isinstance(defaults[section].get(key), tuple) and isinstance(value, list):
        values[key] = tuple(value)
  return ml_collections.ConfigDict(fields)
