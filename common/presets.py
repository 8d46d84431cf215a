"""Named hyperparameter presets: flagfiles under `presets/`.

A preset fills in every flag the user did not set (on the command line or in a
`--flagfile`); what the user sets always wins. Every process of a cluster
resolves the same preset from the same flags, so they agree on every spec
without exchanging files.

  --preset=auto      minitaur for --env=MinitaurBulletEnv-v0, none otherwise
  --preset=minitaur  presets/minitaur.cfg: the settings that learn Minitaur
  --preset=tutorial  presets/tutorial.cfg: the TF-Agents tutorial's settings
  --preset=none      the flag defaults
"""

import os
from typing import Dict, Optional

from common.errors import UserError

import presets as _preset_package  # The flagfiles ship as package data.

PRESET_DIR = os.path.dirname(os.path.abspath(_preset_package.__file__))
AUTO = {'MinitaurBulletEnv-v0': 'minitaur'}


def available():
  if not os.path.isdir(PRESET_DIR):
    return []
  return sorted(f[:-4] for f in os.listdir(PRESET_DIR) if f.endswith('.cfg'))


def resolve(preset: str, env_name: str) -> Optional[str]:
  """The preset name `--preset` and `--env` select, or None."""
  if preset == 'auto':
    return AUTO.get(env_name)
  if preset in ('', 'none'):
    return None
  return preset


def read(name: str) -> Dict[str, str]:
  """{flag: value} of presets/<name>.cfg (`--flag=value` lines, # comments)."""
  path = os.path.join(PRESET_DIR, f'{name}.cfg')
  if not os.path.exists(path):
    raise UserError(f'--preset={name}: no such preset; choose one of '
                    f'{", ".join(available() + ["auto", "none"])}')
  values = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      if not line.startswith('--') or '=' not in line:
        raise UserError(f'{path}:{number}: expected --flag=value, got '
                        f'{line!r}')
      name_, value = line[2:].split('=', 1)
      values[name_] = value
  return values


def apply(flag_values) -> Optional[str]:
  """Sets the preset's values on flags the user left alone; returns its name."""
  name = resolve(flag_values['preset'].value, flag_values['env'].value)
  if name is None:
    return None
  for flag, value in read(name).items():
    if flag not in flag_values:
      raise UserError(f'preset {name}: unknown flag --{flag}')
    if flag in ('preset', 'env'):
      raise UserError(f'preset {name}: may not set --{flag}')
    if not flag_values[flag].present:
      try:
        flag_values[flag].value = flag_values[flag].parser.parse(value)
      except ValueError as e:
        raise UserError(f'preset {name}: --{flag}={value}: {e}') from None
  return name
