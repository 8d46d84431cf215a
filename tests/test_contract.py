"""The run contract: published by the server, checked by each client at connect."""

import threading

import pytest
import reverb

from variable_container import contract
from common.errors import UserError
from tests.cluster import Cluster
from launcher.local_cluster import free_port
from replay_server import server as server_lib

RUN = {'env': 'Pendulum-v1', 'agent': 'sac', 'max_episode_steps': 0,
       'discretize_actions': 0, 'action_repeat': 1, 'gamma': 0.99,
       'n_step': 1, 'replay': 'uniform', 'reward_scale_factor': 1.0}


@pytest.fixture
def published():
  """A served contract table holding RUN."""
  server = reverb.Server([contract.contract_table()], port=free_port())
  address = f'localhost:{server.port}'
  contract.publish(reverb.Client(address), RUN)
  yield address
  server.stop()


@pytest.mark.parametrize('flag, value, theirs', [
    ('action_repeat', 4, '1'), ('gamma', 0.9, '0.99'),
    ('replay', 'prioritized', 'uniform')])
def test_a_differing_flag_is_one_line_naming_it(published, flag, value,
                                                theirs):
  mine = dict(RUN, **{flag: value})
  with pytest.raises(UserError) as e:
    contract.check(published, mine, 'actor')
  message = str(e.value)
  assert '\n' not in message
  assert message == (
      f'--{flag}={value} here, but the replay server at {published} runs '
      f'--{flag}={theirs}: every process of a run needs the same --{flag} '
      '(give them one --flagfile)')


def test_two_differing_flags_name_the_first(published):
  mine = dict(RUN, action_repeat=2, gamma=0.5)
  with pytest.raises(UserError, match=r'^--action_repeat=2 here, .* runs '
                     r'--action_repeat=1: '):
    contract.check(published, mine, 'learner')


def test_equal_contracts_pass_and_none_is_not_checked(published):
  contract.check(published, dict(RUN), 'learner')
  contract.check(published, None, 'learner')
  assert contract.read(reverb.Client(published)) == RUN
  # The latest contract replaces the one before (one item).
  contract.publish(reverb.Client(published), dict(RUN, gamma=0.5))
  assert contract.read(reverb.Client(published))['gamma'] == 0.5


def test_a_server_without_the_table_passes_quietly():
  server = reverb.Server([reverb.Table.queue('other', 10)], port=free_port())
  try:
    address = f'localhost:{server.port}'
    contract.check(address, dict(RUN, gamma=0.1), 'actor')
    assert contract.read(reverb.Client(address)) is None
  finally:
    server.stop()


def test_serve_publishes_its_contract():
  """`serve` publishes the contract it is given, for clients to check."""
  stop = threading.Event()
  port = free_port()
  serving = threading.Thread(target=server_lib.serve, daemon=True, args=(
      [contract.contract_table()], port, stop), kwargs=dict(contract=RUN))
  serving.start()
  try:
    client = reverb.Client(f'localhost:{port}')
    assert contract.read(client, timeout_s=30) == RUN
    with pytest.raises(UserError, match='--gamma=0.9 here'):
      contract.check(f'localhost:{port}', dict(RUN, gamma=0.9), 'actor')
  finally:
    stop.set()
    serving.join(30)


def test_replay_server_process_publishes_the_flags_contract(tmp_path):
  """`python -m replay_server` publishes the run contract (RunConfig.contract)."""
  cluster = Cluster(str(tmp_path))
  port = free_port()
  try:
    cluster.start('server', 'replay_server', [
        '--env=Pendulum-v1', '--gamma=0.95', '--action_repeat=2',
        '--actor_fc_layers=8', '--critic_joint_fc_layers=8',
        f'--port={port}', f'--replay_address=localhost:{port}'])
    cluster.wait_for_log('server', 'serving tables', 120)
    published = contract.read(reverb.Client(f'localhost:{port}'))
    assert published['gamma'] == 0.95 and published['action_repeat'] == 2
    assert published['env'] == 'Pendulum-v1'
    assert 'every network interface' in cluster.log('server')
    with pytest.raises(UserError, match=r'--action_repeat=1 here, but the '
                       r'replay server at .* runs --action_repeat=2'):
      contract.check(f'localhost:{port}', dict(published, action_repeat=1),
                     'actor')
  finally:
    cluster.stop_all()
