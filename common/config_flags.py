"""The absl flags of every setting in `common.config`, and the role configs
built from them.

Every binary defines every flag, so one `--flagfile` configures a whole
cluster; a binary's `--help` shows the flags its role reads (`--helpfull`:
all of them). Nothing here declares a setting: each flag's name, default,
help and bounds come from its `config.setting(...)` declaration.

  config = config_flags.build(config.LearnerConfig)  # In learner/__main__.py.
"""

import dataclasses
import sys
from typing import Any, Dict

from absl import flags

from common import config as config_lib
from common.errors import UserError

FLAGS = flags.FLAGS

ROLES = tuple(config_lib.ROLE_CONFIGS)
_AGENT_OF = {cls: name for name, cls in config_lib.AGENT_CONFIGS.items()}


def _flag_default(s: config_lib.Setting):
  if s.kind == 'list' and s.default is not None:
    return [str(x) for x in s.default]
  return s.default


def _shown(default) -> str:
  return ','.join(default) if isinstance(default, list) else str(default)


def _define(flag: str, declared) -> None:
  """Defines `--flag` from its declarations (one, or one per agent)."""
  s = declared[0][2]
  default, help_text = _flag_default(s), s.help
  defaults = {cls: _flag_default(d) for cls, _, d in declared}
  if len({repr(d) for d in defaults.values()}) > 1:
    # Declared by each agent with its own default (e.g. --batch_size): the
    # flag is unset unless given, and each agent then takes its own.
    default = None
    help_text += ' (default: ' + ', '.join(
        f'{_AGENT_OF.get(cls, cls.__name__)} {_shown(d)}'
        for cls, d in defaults.items()) + ')'
  bounds = {k: v for k, v in (('lower_bound', s.lower),
                               ('upper_bound', s.upper)) if v is not None}
  if s.kind == 'enum':
    flags.DEFINE_enum(flag, default, list(s.choices), help_text)
  elif s.kind == 'boolean':
    flags.DEFINE_boolean(flag, default, help_text)
  elif s.kind == 'integer':
    flags.DEFINE_integer(flag, default, help_text, **bounds)
  elif s.kind == 'float':
    flags.DEFINE_float(flag, default, help_text, **bounds)
  elif s.kind == 'list':
    flags.DEFINE_list(flag, default, help_text)
  else:
    flags.DEFINE_string(flag, default, help_text)


def define_flags() -> None:
  """Defines the flag of every setting (once per process)."""
  for flag, declared in config_lib.all_settings().items():
    if flag not in FLAGS:
      _define(flag, declared)


define_flags()


def declare_key_flags(role: str) -> None:
  """Makes `--help` of the running binary list the flags `role` reads."""
  for flag in role_flags(role):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[flag])


def role_flags(role: str):
  """The flags the configs of `role` (config.ROLE_CONFIGS) read, in order."""
  found = []
  for top in config_lib.ROLE_CONFIGS[role]:
    for cls in config_lib.nested_configs(top):
      for field in dataclasses.fields(cls):
        s = config_lib.setting_of(field)
        derivation = config_lib.derivation_of(field)
        if s is not None:
          found.append(s.flag)
        elif derivation is not None:
          found += derivation[1]
      if cls is top:
        found.append('preset')
  return tuple(dict.fromkeys(found))


def values(flag_values=FLAGS) -> Dict[str, Any]:
  """Every setting's flag value by name, as the chosen agent sees it: an
  agent setting left unset (None) takes that agent's default."""
  found = {name: flag_values[name].value
           for name in config_lib.all_settings()}
  agent_cls = config_lib.AGENT_CONFIGS[found['agent']]
  for field, s in config_lib.settings(agent_cls):
    if found[s.flag] is None and field.default is not None:
      found[s.flag] = field.default
  return found


def _field_value(s: config_lib.Setting, v: Dict[str, Any]):
  value = v[s.flag]
  if value is not None and s.parse is not None and not (
      s.kind == 'list' and isinstance(value, tuple)):
    try:
      value = s.parse(value)
    except UserError as e:
      shown = ','.join(value) if isinstance(value, list) else value
      raise UserError(f'--{s.flag}={shown}: {e}') from None
  elif s.kind == 'list' and isinstance(value, list):
    value = tuple(value)
  if s.resolve is not None:
    value = s.resolve(value, v)
  return value


def _build(cls, v: Dict[str, Any]):
  kwargs = {}
  for field in dataclasses.fields(cls):
    s = config_lib.setting_of(field)
    derivation = config_lib.derivation_of(field)
    if s is not None:
      kwargs[field.name] = _field_value(s, v)
    elif derivation is not None:
      kwargs[field.name] = derivation[0](v)
    elif field.name == 'agent':
      kwargs[field.name] = _build(config_lib.AGENT_CONFIGS[v['agent']], v)
    elif dataclasses.is_dataclass(field.type):
      kwargs[field.name] = _build(field.type, v)
  return cls(**kwargs)


def build(cls, flag_values=FLAGS):
  """The config `cls` (e.g. config.LearnerConfig) from the parsed flags.

  Raises:
    UserError: a value that no role could run with, in one line.
  """
  v = values(flag_values)
  if v['agent'] == 'sac' and v['n_step'] != 1:
    raise UserError(f"--n_step={v['n_step']} needs --agent=dqn: TF-Agents' "
                    'SAC trains on 2-step transitions only')
  config = _build(cls, v)
  replay = getattr(config, 'replay', None)
  if isinstance(replay, config_lib.ReplayConfig):
    config_lib.check_replay(replay, config.agent.batch_size)
  return config
