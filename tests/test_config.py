"""Each setting is declared once (common/config.py); flags, role configs and
each binary's --help come from that declaration."""

import dataclasses
import os
import subprocess
import sys

from absl import flags
import pytest

from common import config as config_lib
from common import config_flags
from common.errors import UserError
from launcher.local_cluster import REPO_ROOT

FLAGS = flags.FLAGS


@pytest.fixture
def parsed():
  """Parses argv into the global flags; they are unparsed afterwards."""

  def parse(*argv):
    FLAGS.unparse_flags()
    FLAGS(['test'] + list(argv))
    return FLAGS

  yield parse
  FLAGS.unparse_flags()


def test_every_flag_comes_from_one_declaration():
  declared = config_lib.all_settings()
  for name, where in declared.items():
    assert name in FLAGS, name
    # Two declarations of one flag only where each agent has its own field
    # (e.g. --gamma, --batch_size), never in two role configs.
    assert len(where) == 1 or {cls for cls, _, _ in where} <= set(
        config_lib.AGENT_CONFIGS.values()), (name, where)
    assert where[0][2].help in FLAGS[name].help, name


def test_a_role_config_holds_the_flag_values(parsed):
  parsed('--env=CartPole-v1', '--agent=dqn', '--q_fc_layers=8,4',
         '--replay_address=localhost:1,localhost:2', '--push_interval_steps=7',
         '--replay=prioritized')
  learner = config_flags.build(config_lib.LearnerConfig)
  assert learner.env_name == 'CartPole-v1'
  assert learner.agent == config_lib.DqnConfig(q_fc_layers=(8, 4))
  assert learner.replay_shards == ('localhost:1', 'localhost:2')
  assert learner.replay_address == 'localhost:1'
  assert learner.variable_address == 'localhost:1'
  assert learner.variables_on_shards
  assert learner.push_interval_steps == 7 and learner.prioritized
  assert learner.contract['replay'] == 'prioritized'
  assert set(learner.contract) == set(config_lib.contract_flags())


def test_each_agent_takes_its_own_default_of_a_shared_flag(parsed):
  assert 'sac 256, dqn 64' in FLAGS['batch_size'].help
  parsed('--agent=sac')
  assert config_flags.build(config_lib.LearnerConfig).agent.batch_size == 256
  parsed('--agent=dqn')
  server = config_flags.build(config_lib.ReplayServerConfig)
  assert server.agent.batch_size == 64
  # --samples_per_insert defaults to the batch size of the agent.
  assert server.replay.samples_per_insert == 64.0
  parsed('--agent=dqn', '--batch_size=32', '--rate_limiter=min_size',
         '--min_size_to_sample=32')
  server = config_flags.build(config_lib.ReplayServerConfig)
  assert server.agent.batch_size == 32
  assert server.replay.samples_per_insert is None


def test_bad_values_are_one_line_errors(parsed):
  parsed('--actor_fc_layers=256,x')
  with pytest.raises(UserError, match=r'^--actor_fc_layers=256,x: expected'):
    config_flags.build(config_lib.LearnerConfig)
  parsed('--task=first')
  with pytest.raises(UserError, match=r"^--task=first: expected an index"):
    config_flags.build(config_lib.CollectConfig)
  parsed('--min_size_to_sample=20000')
  with pytest.raises(UserError, match='larger than --replay_capacity'):
    config_flags.build(config_lib.ReplayServerConfig)


def test_a_config_built_in_code_needs_no_flags():
  config = config_lib.LearnerConfig(env_name='CartPole-v0',
                                    replay_address='localhost:5')
  assert config.shards == ('localhost:5',)
  assert config.agent == config_lib.SacConfig()
  assert dataclasses.replace(config, train_steps=3).train_steps == 3


def _help(module: str) -> str:
  out = subprocess.run([sys.executable, '-m', module, '--help'],
                       cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  return out.stdout + out.stderr


def test_help_shows_the_flags_of_the_role():
  learner = _help('learner')
  assert '--push_interval_steps' in learner and '--tpu_address' in learner
  assert '--actor_fc_layers' in learner and '--env' in learner
  assert '--video_size' not in learner and '--checkpoint_dir' not in learner
  actor = _help('actor')
  assert '--video_size' in actor and '--envs_per_actor' in actor
  assert '--tpu_address' not in actor and '--replay_capacity' not in actor
  server = _help('replay_server')
  assert '--replay_capacity' in server and '--checkpoint_dir' in server
  assert '--push_interval_steps' not in server and '--video_size' not in server


def test_every_binary_accepts_every_flag():
  # One flagfile configures the cluster: a flag of another role is no error.
  out = subprocess.run(
      [sys.executable, '-m', 'replay_server', '--video_size=10,10',
       '--push_interval_steps=3', '--replay_capacity=0'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert 'replay_capacity' in out.stderr and 'video_size' not in out.stderr
