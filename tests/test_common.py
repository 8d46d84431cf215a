"""Unit tests of common/: environments, agent specs, tables, Reverb helpers."""

import threading
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf

from actor import actor_index
from actor.collect import initial_collect_share
from common import agents
from common import config as config_lib
from common import table_names
from common import environments
from common import reverb_connection
from common.errors import UserError
from launcher.local_cluster import free_port
from replay_server import actor_indices
from replay_server import tables
from variable_container.client import VariableContainerClient

TINY_SAC = config_lib.SacConfig(actor_fc_layers=(8,), critic_joint_fc_layers=(8,),
                                batch_size=4)


def test_minitaur_loads_through_pybullet_suite():
  env = environments.load_environment('MinitaurBulletEnv-v0')
  assert env.observation_spec().shape == (28,)
  assert env.action_spec().shape == (8,)
  assert float(env.action_spec().minimum) == -1.0
  env.close()


def test_gym_id_loads_through_gym_suite():
  env = environments.load_environment('Pendulum-v1')
  assert env.observation_spec().shape == (3,)
  time_step = env.reset()
  assert time_step.observation.shape == (3,)


def test_unknown_environment_is_one_line_with_suggestion():
  with pytest.raises(UserError) as e:
    environments.load_environment('MinitaurBulletEnv-v9')
  message = str(e.value)
  assert '\n' not in message
  assert "unknown environment --env='MinitaurBulletEnv-v9'" in message
  assert 'MinitaurBulletEnv-v0' in message


def test_sac_on_discrete_actions_is_a_clear_error():
  env = environments.load_environment('CartPole-v0')
  with pytest.raises(UserError, match='discrete actions'):
    agents.create_agent(env, TINY_SAC, env_name='CartPole-v0')


def test_default_hyperparameters_are_the_tutorials():
  sac, replay = config_lib.SacConfig(), config_lib.ReplayConfig()
  assert sac.actor_fc_layers == (256, 256)
  assert sac.critic_joint_fc_layers == (256, 256)
  assert (sac.actor_learning_rate, sac.critic_learning_rate,
          sac.alpha_learning_rate) == (3e-4, 3e-4, 3e-4)
  assert (sac.target_update_tau, sac.target_update_period, sac.gamma,
          sac.reward_scale_factor, sac.batch_size) == (0.005, 1, 0.99, 1.0, 256)
  assert replay.replay_capacity == 10000


@pytest.mark.parametrize('address', ['localhost', 'localhost:', ':80',
                                     'host:99999', 'host:port', ''])
def test_bad_addresses_are_rejected(address):
  with pytest.raises(UserError, match='is not host:port'):
    reverb_connection.parse_address(address)


def test_initial_collect_shares_sum_to_total():
  for total, actors in [(10000, 3), (7, 2), (0, 4), (5, 8)]:
    shares = [initial_collect_share(total, actors, t) for t in range(actors)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_wait_for_server_times_out_with_one_line():
  start = time.monotonic()
  with pytest.raises(UserError) as e:
    reverb_connection.wait_for_server(f'localhost:{free_port()}', 2, 'test')
  assert time.monotonic() - start < 15
  assert 'did not answer within 2s' in str(e.value)
  assert '\n' not in str(e.value)


def test_wait_for_server_proceeds_once_server_is_up():
  port = free_port()
  env = environments.load_environment('Pendulum-v1')
  agent = agents.create_agent(env, TINY_SAC)
  built = tables.build_tables('Pendulum-v1', TINY_SAC,
                              config_lib.ReplayConfig(min_size_to_sample=10))
  servers = []
  timer = threading.Timer(3, lambda: servers.append(
      reverb.Server(built, port=port)))
  timer.start()
  try:
    start = time.monotonic()
    info = reverb_connection.wait_for_server(f'localhost:{port}', 60, 'test')
    assert time.monotonic() - start >= 2.5
    reverb_connection.check_table_signature(
        info, table_names.REPLAY_TABLE, agents.replay_signature(agent),
        f'localhost:{port}')
  finally:
    timer.join()
    for s in servers:
      s.stop()


def test_signature_mismatch_names_table_and_specs():
  built = tables.build_tables('Pendulum-v1', TINY_SAC,
                              config_lib.ReplayConfig(min_size_to_sample=10))
  server = reverb.Server(built, port=free_port())
  try:
    env = environments.load_environment('MinitaurBulletEnv-v0')
    other = agents.create_agent(env, TINY_SAC)
    info = reverb.Client(f'localhost:{server.port}').server_info()
    with pytest.raises(UserError) as e:
      reverb_connection.check_table_signature(
          info, table_names.REPLAY_TABLE, agents.replay_signature(other),
          f'localhost:{server.port}')
    message = str(e.value)
    assert "table 'uniform_table'" in message
    assert 'float32[2, 3]' in message and 'float32[2, 28]' in message
  finally:
    server.stop()


def test_variables_round_trip_through_the_container():
  built = tables.build_tables('Pendulum-v1', TINY_SAC, replay=None)
  # The run's contract table is served too (issue 18, variable_container/contract.py),
  # and each role's status (variable_container/status.py).
  assert [t.name for t in built if t.name != 'run_contract' and
          not t.name.startswith('status_')] == ['variables', 'train_step']
  server = reverb.Server(built, port=free_port())
  address = f'localhost:{server.port}'
  try:
    env = environments.load_environment('Pendulum-v1')
    learner_agent = agents.create_agent(env, TINY_SAC)
    actor_agent = agents.create_agent(env, TINY_SAC)
    pushed = agents.shared_variables(learner_agent,
                                     learner_agent.train_step_counter)
    pulled = agents.shared_variables(actor_agent,
                                     actor_agent.train_step_counter)
    learner_agent.train_step_counter.assign(42)
    client = VariableContainerClient(address, pushed, timeout_s=10)
    assert client.pull_into(pulled, wait=False) is None
    client.push(pushed)
    assert client.pull_into(pulled) == 42
    for a, b in zip(tf.nest.flatten(pushed), tf.nest.flatten(pulled)):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert client.latest_train_step() == 42
  finally:
    server.stop()


def test_rate_limiter_follows_replay_config():
  limiter = tables.replay_rate_limiter(
      config_lib.ReplayConfig(min_size_to_sample=100, samples_per_insert=None),
      batch_size=32)
  assert isinstance(limiter, reverb.rate_limiters.MinSize)
  ratio = tables.replay_rate_limiter(
      config_lib.ReplayConfig(min_size_to_sample=100, samples_per_insert=4),
      batch_size=32)
  assert isinstance(ratio, reverb.rate_limiters.SampleToInsertRatio)


def test_auto_actor_ids_are_distinct_and_in_order():
  built = tables.build_tables('Pendulum-v1', TINY_SAC,
                              config_lib.ReplayConfig(min_size_to_sample=10))
  server = reverb.Server(built, port=free_port())
  address = f'localhost:{server.port}'
  try:
    actor_indices.fill_actor_ids(address)
    actor_indices.fill_actor_ids(address)  # Idempotent: a restart keeps the queue.
    assert [actor_index.claim_actor_id(address) for _ in range(3)] == [0, 1, 2]
  finally:
    server.stop()


def test_auto_actor_id_needs_the_queue_table():
  built = tables.build_tables('Pendulum-v1', TINY_SAC, replay=None)
  server = reverb.Server(built, port=free_port())
  try:
    with pytest.raises(UserError, match="no 'actor_ids' table"):
      actor_index.claim_actor_id(f'localhost:{server.port}')
  finally:
    server.stop()


def test_alive_bonus_reaches_the_learner_not_the_table():
  """Transitions that continue get the bonus; those that end an episode don't."""
  from learner import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from tf_agents.replay_buffers import reverb_utils  # pylint: disable=g-import-not-at-top
  from tf_agents.trajectories import trajectory  # pylint: disable=g-import-not-at-top
  env = environments.load_environment('Pendulum-v1')
  agent = agents.create_agent(env, TINY_SAC)
  table = tables.replay_table(
      agents.replay_signature(agent),
      config_lib.ReplayConfig(replay_capacity=100, min_size_to_sample=1,
                              samples_per_insert=None), batch_size=4)
  server = reverb.Server([table], port=free_port())
  address = f'localhost:{server.port}'
  try:
    observer = reverb_utils.ReverbAddTrajectoryObserver(
        reverb.Client(address), table_names.REPLAY_TABLE, sequence_length=2,
        stride_length=1)
    obs, act = np.zeros(3, np.float32), np.zeros(1, np.float32)
    # One 3-step episode that ends by termination (discount 0 at the end).
    steps = [trajectory.first(obs, act, (), np.float32(1.0), np.float32(1.0)),
             trajectory.mid(obs, act, (), np.float32(2.0), np.float32(0.0)),
             trajectory.boundary(obs, act, (), np.float32(0.0),
                                 np.float32(1.0))]
    steps[1] = steps[1]._replace(next_step_type=np.int32(2))  # LAST next.
    for step in steps:
      observer(step)
    observer.close()
    dataset = dataset_lib.experience_dataset(
        address, table_names.REPLAY_TABLE, agent.collect_data_spec,
        batch_size=64, sequence_length=2, parallel_readers=1,
        alive_bonus=0.5)
    experience, _ = next(iter(dataset))
    first = experience.reward.numpy()[:, 0]
    # Item 1 starts with reward 1 (goes on: +0.5); item 2 with reward 2 and
    # discount 0 (the episode ended there: no bonus).
    assert set(np.round(first, 3)) == {1.5, 2.0}, first
    plain = dataset_lib.experience_dataset(
        address, table_names.REPLAY_TABLE, agent.collect_data_spec,
        batch_size=64, sequence_length=2, parallel_readers=1)
    experience, _ = next(iter(plain))
    assert set(np.round(experience.reward.numpy()[:, 0], 3)) == {1.0, 2.0}
  finally:
    server.stop()
