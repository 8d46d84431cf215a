"""Hyperparameter presets: presets/<name>.cfg under --preset."""

import subprocess
import sys

from absl import flags
import pytest

from common import config_flags  # pylint: disable=unused-import  (defines)
from common import presets
from common.errors import UserError
from launcher.local_cluster import REPO_ROOT


def _flag_values(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string('env', 'MinitaurBulletEnv-v0', '', flag_values=fv)
  flags.DEFINE_string('preset', 'auto', '', flag_values=fv)
  flags.DEFINE_integer('replay_capacity', 10000, '', flag_values=fv)
  flags.DEFINE_float('reward_scale_factor', 1.0, '', flag_values=fv)
  for name in presets.read('minitaur'):
    if name not in fv:
      flags.DEFINE_string(name, None, '', flag_values=fv)
  fv(['prog'] + argv)
  return fv


def test_auto_picks_minitaur_for_minitaur_and_nothing_else():
  fv = _flag_values([])
  assert presets.apply(fv) == 'minitaur'
  assert fv.replay_capacity == int(presets.read('minitaur')['replay_capacity'])
  fv = _flag_values(['--env=Pendulum-v1'])
  assert presets.apply(fv) is None
  assert fv.replay_capacity == 10000 and fv.reward_scale_factor == 1.0


def test_flags_the_user_gives_win_over_the_preset():
  fv = _flag_values(['--reward_scale_factor=3'])
  presets.apply(fv)
  assert fv.reward_scale_factor == 3.0
  assert fv.replay_capacity != 10000  # The preset's value.


def test_tutorial_preset_is_the_flag_defaults():
  """--preset=tutorial and --preset=none must train the same agent."""
  for name, value in presets.read('tutorial').items():
    flag = flags.FLAGS[name]
    assert flag.parser.parse(value) == flag.default, name


def test_every_preset_names_real_flags():
  for preset in presets.available():
    for name in presets.read(preset):
      assert name in flags.FLAGS, f'{preset}: --{name}'


def test_unknown_preset_is_one_line_error():
  with pytest.raises(UserError, match='no such preset; choose one of'):
    presets.apply(_flag_values(['--preset=fast']))
  out = subprocess.run([sys.executable, '-m', 'launcher', '--preset=fast'],
                       cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      'launcher: error: --preset=fast: no such preset; choose one of '
      'minitaur, tutorial, auto, none']
