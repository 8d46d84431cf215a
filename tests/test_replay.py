"""Prioritized replay, N-step items, Ape-X exploration, and the agent interface."""

import dataclasses
import tempfile
import threading
import types

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.agents.dqn import dqn_agent
from tf_agents.networks import q_network
from tf_agents.specs import tensor_spec
from tf_agents.train.utils import spec_utils
from tf_agents.train.utils import train_utils

from actor import collect as collect_lib
from common import agents
from common import compat
from common import config as config_lib
from common import table_names
from common import environments
from common.errors import UserError
from learner import priorities
from learner import train as train_lib
from launcher.local_cluster import free_port
from replay_server import server as server_lib
from replay_server import tables
from tests.test_common import TINY_SAC
from variable_container import contract
from variable_container import one_value

TINY_DQN = config_lib.DqnConfig(q_fc_layers=(16,), batch_size=8)


def _random_batch(agent, batch_size, seed=0):
  """A batch of `agent.train_sequence_length`-step items with random values."""
  spec = tensor_spec.add_outer_dims_nest(
      agent.collect_data_spec, (batch_size, agents.sequence_length(agent)))
  experience = tensor_spec.sample_spec_nest(spec, seed=seed)
  # Finite observations and rewards (the specs' bounds are up to 3.4e38), and
  # mid-episode steps (discount 1), so every item has a TD target.
  rng = tf.random.Generator.from_seed(seed)
  return experience._replace(
      observation=tf.clip_by_value(experience.observation, -1, 1),
      reward=rng.normal(experience.reward.shape),
      step_type=tf.ones_like(experience.step_type),
      next_step_type=tf.ones_like(experience.next_step_type),
      discount=tf.ones_like(experience.discount))


def test_importance_weights_follow_the_sampling_probabilities():
  weights = priorities.importance_weights(
      tf.constant([0.1, 0.2, 0.4, 0.3], tf.float64), tf.constant(10, tf.int64),
      beta=1.0)
  np.testing.assert_allclose(weights.numpy(), [1, 0.5, 0.25, 1 / 3],
                             rtol=1e-6)
  flat = priorities.importance_weights(tf.constant([0.25] * 4, tf.float64),
                                       tf.constant(4, tf.int64), beta=0.4)
  np.testing.assert_allclose(flat.numpy(), [1, 1, 1, 1])
  assert float(priorities.annealed_exponent(0.4, 0, 1000)) == pytest.approx(
      0.4)
  assert float(priorities.annealed_exponent(0.4, 500, 1000)) == pytest.approx(
      0.7)
  assert float(priorities.annealed_exponent(0.4, 2000, 1000)) == 1.0


@pytest.mark.parametrize('env_name, config', [('CartPole-v0', TINY_DQN),
                                              ('Pendulum-v1', TINY_SAC)])
def test_importance_weights_reach_the_loss(env_name, config):
  """The train step's loss is the IS-weighted one; TD errors come per item."""
  env = environments.load_environment(env_name)
  agent = agents.create_agent(env, config)
  train = agents.train_with_td_errors(agent, config)
  experience = _random_batch(agent, 8)
  weights = tf.constant([1, 0.5, 0.25, 1, 0.1, 1, 0.75, 0.2], tf.float32)
  if isinstance(config, config_lib.DqnConfig):
    # DQN's loss is deterministic and computed before the update: the train
    # step's loss is exactly the weighted one. (SAC samples actions inside
    # its losses, so only the zero-weight check below applies to it.)
    unweighted = float(agent.loss(experience).loss)
    expected = float(agent.loss(experience, weights=weights).loss)
    assert abs(expected - unweighted) > 0.01 * abs(unweighted)
    loss_info, _ = train(experience, weights)
    assert float(loss_info.loss) == pytest.approx(expected, rel=1e-3)
  loss_info, td_errors = train(experience, tf.ones([8]))
  assert abs(float(loss_info.loss)) > 1e-4
  assert td_errors.shape == (8,)
  assert np.all(td_errors.numpy() >= 0) and np.all(
      np.isfinite(td_errors.numpy()))
  zero, _ = train(experience, tf.zeros([8]))
  assert float(zero.loss) == pytest.approx(0.0, abs=1e-6)


def test_apex_epsilons_span_greedy_to_exploratory():
  config = dataclasses.replace(TINY_DQN, epsilon_schedule='apex')
  epsilons = [agents.collect_config(config, i, 8).epsilon_greedy
              for i in range(8)]
  assert epsilons[0] == pytest.approx(0.4)
  assert epsilons[7] == pytest.approx(0.4 ** 8)
  assert epsilons[3] == pytest.approx(0.4 ** (1 + 7 * 3 / 7))
  assert all(a > b for a, b in zip(epsilons, epsilons[1:]))
  assert agents.collect_config(config, 0, 1).epsilon_greedy == 0.4
  # The actor's collect policy explores with its own epsilon.
  env = environments.load_environment('CartPole-v0')
  agent = agents.create_agent(env, agents.collect_config(config, 7, 8))
  assert compat.epsilon(agent.collect_policy) == pytest.approx(0.4 ** 8)
  assert agents.collect_config(TINY_DQN, 7, 8) == TINY_DQN  # fixed
  assert agents.collect_config(TINY_SAC, 7, 8) == TINY_SAC


def test_dqn_defaults_are_double_dqn_with_squared_loss():
  env = environments.load_environment('CartPole-v0')
  agent = agents.create_agent(env, TINY_DQN)
  assert isinstance(agent, dqn_agent.DdqnAgent)
  plain = agents.create_agent(env, dataclasses.replace(
      TINY_DQN, double=False, loss='huber'))
  assert type(plain) is dqn_agent.DqnAgent  # pylint: disable=unidiomatic-typecheck


def test_n_step_items_have_n_plus_one_steps_in_the_signature():
  env = environments.load_environment('CartPole-v0')
  agent = agents.create_agent(env, dataclasses.replace(TINY_DQN, n_step=3))
  assert agents.sequence_length(agent) == 4
  assert agents.replay_signature(agent).observation.shape[0] == 4


def test_restore_keeps_items_and_priorities():
  """As Reverb's own SaveAndLoad test: every item comes back with its data
  (each step) and its priority, not only the table's size."""
  replay = config_lib.ReplayConfig(prioritized=True, min_size_to_sample=1,
                                   samples_per_insert=None)
  checkpoints = tempfile.mkdtemp()

  def serve():
    table = tables.replay_table(tf.TensorSpec([2], tf.float32), replay, 1)
    server = server_lib.start_server([table], free_port(), checkpoints)
    return server, reverb.Client(f'localhost:{server.port}')

  def items_by_key(client):
    """{key: (priority, the item's steps)}, from enough samples to see all."""
    samples = client.sample(table_names.REPLAY_TABLE, num_samples=300)
    # The Python sampler hands back one entry per step of an item.
    return {s[0].info.key: (s[0].info.priority,
                            tuple(float(step.data[0]) for step in s))
            for s in samples}

  server, client = serve()
  try:
    with client.trajectory_writer(2) as writer:
      for i in range(6):
        writer.append(np.float32(10 * i + 1))
        if i:
          writer.create_item(table_names.REPLAY_TABLE, priority=1.0,
                             trajectory=writer.history[-2:])
    keys = sorted(items_by_key(client))
    assert len(keys) == 5
    written = {key: float(i + 2) for i, key in enumerate(keys)}
    client.mutate_priorities(table_names.REPLAY_TABLE, updates=written)
    before = items_by_key(client)
    assert {p for p, _ in before.values()} == set(written.values())
    assert sorted(steps for _, steps in before.values()) == [
        (10 * i + 1, 10 * i + 11) for i in range(5)]
    client.checkpoint()
  finally:
    server.stop()
  server, client = serve()
  try:
    assert items_by_key(client) == before
  finally:
    server.stop()


def test_prioritized_n_step_cluster_trains_and_rewrites_priorities(cluster):
  """Separate processes: DQN with 3-step returns on a prioritized table.

  The learner finishes; the items on the server hold 4 steps; their
  priorities are no longer all the initial one but the learner's |TD
  errors|; new items entered at the max priority the learner published.
  """
  port = free_port()
  address = f'localhost:{port}'
  common_flags = [
      '--env=CartPole-v0', '--agent=dqn', '--n_step=3', '--q_fc_layers=32',
      '--replay=prioritized', '--replay_capacity=5000',
      '--min_size_to_sample=200', '--initial_collect_steps=200',
      # MinSize: so this test can sample the table after the learner is done.
      '--rate_limiter=min_size', f'--replay_address={address}',
      '--train_steps=400', '--server_timeout_s=60', '--log_interval_s=2']
  cluster.start('server', 'replay_server', common_flags + [f'--port={port}'])
  cluster.start('actor', 'actor', common_flags + [
      f'--root_dir={cluster.log_dir}/actor', '--pull_interval_steps=20'])
  cluster.start('learner', 'learner', common_flags + [
      f'--root_dir={cluster.log_dir}/learner', '--push_interval_steps=20',
      '--policy_save_interval=100000'])
  assert cluster.wait('learner', 240) == 0, cluster.tail('learner')
  assert 'priority updates written, 0 dropped' in cluster.log('learner')
  client = reverb.Client(address)
  samples = list(client.sample(table_names.REPLAY_TABLE, num_samples=500))
  # The Python sampler hands back one entry per step of an item.
  assert {len(s) for s in samples} == {4}
  by_key = {s[0].info.key: s[0].info.priority for s in samples}
  assert len(set(by_key.values())) > 20, sorted(set(by_key.values()))[:10]
  published = one_value.read_max_priority(client)
  assert published is not None and published > 0
  assert cluster.wait('actor', 60) == 0, cluster.tail('actor')


# --- A third agent: one module, no change to the learner, actor or server.


@dataclasses.dataclass(frozen=True)
class LinearQConfig:
  """A trivial agent: Q-learning with a linear Q function."""
  batch_size: int = 16
  learning_rate: float = 1e-2


def _linear_q_module():
  module = types.ModuleType('linear_q')

  def create(env, config, train_step=None, env_name=''):
    del env_name
    _, action_spec, time_step_spec = spec_utils.get_tensor_specs(env)
    q_net = q_network.QNetwork(time_step_spec.observation, action_spec,
                               fc_layer_params=())
    agent = dqn_agent.DqnAgent(
        time_step_spec, action_spec, q_network=q_net,
        optimizer=tf.compat.v1.train.GradientDescentOptimizer(
            config.learning_rate),
        train_step_counter=(train_step if train_step is not None
                            else train_utils.create_train_step()))
    agent.initialize()
    return agent

  def train_with_td_errors(agent):
    agent_train = agent.train

    def train(experience, weights):
      loss_info = agent_train(experience, weights=weights)
      return loss_info, tf.abs(loss_info.extra.td_error)

    return train

  module.create = create
  module.collect_config = lambda config, i, n: config
  module.train_with_td_errors = train_with_td_errors
  module.greedy_policy = lambda agent: agent.policy
  module.collect_policy = lambda agent: agent.collect_policy
  return module


def test_a_third_agent_is_one_module(tmp_path):
  """Server tables, an actor and a learner run it, in this process."""
  agents.register(LinearQConfig, _linear_q_module())
  config = LinearQConfig()
  replay = config_lib.ReplayConfig(replay_capacity=2000, min_size_to_sample=50,
                                   samples_per_insert=None, prioritized=True)
  built = tables.build_tables('CartPole-v0', config, replay)
  server = server_lib.start_server(built, free_port())
  address = f'localhost:{server.port}'
  stop = threading.Event()
  actor_error = []

  def collect():
    try:
      collect_lib.collect(config_lib.CollectConfig(
          env_name='CartPole-v0', root_dir=str(tmp_path / 'actor'),
          replay_address=address, variable_address=address,
          max_train_steps=60, initial_collect_steps=50,
          pull_interval_steps=10, agent=config, server_timeout_s=120),
                          stop.is_set)
    except BaseException as e:  # pylint: disable=broad-except
      actor_error.append(e)
      raise

  try:
    actor = threading.Thread(target=collect, daemon=True)
    actor.start()
    # The table reaches its minimum size only with the actor's steps after
    # its random share: a learner whose actor died stops (and the test
    # fails saying why) rather than waiting for items forever.
    result = train_lib.train(
        config_lib.LearnerConfig(
            env_name='CartPole-v0', root_dir=str(tmp_path / 'learner'),
            replay_address=address, variable_address=address,
            train_steps=60, agent=config, push_interval_steps=10,
            policy_save_interval=100000, server_timeout_s=120,
            prioritized=True),
        tf.distribute.get_strategy(), should_stop=lambda: not actor.is_alive())
    assert result.train_step == 60 and np.isfinite(result.loss), actor_error
    actor.join(60)
    assert not actor.is_alive()
    sampled = client_priorities(address)
    assert len(set(sampled)) > 1
  finally:
    stop.set()
    server.stop()


def client_priorities(address):
  samples = reverb.Client(address).sample(table_names.REPLAY_TABLE,
                                          num_samples=100)
  return [s[0].info.priority for s in samples]


def test_packed_layout_is_the_servers_table_and_part_of_the_contract():
  """--replay_layout=packed: the server's replay table holds one float32
  tensor per item; a process with the other layout is refused in one line."""
  replay = config_lib.ReplayConfig(replay_layout='packed',
                                   min_size_to_sample=1,
                                   samples_per_insert=None)
  served = tables.build_tables('Pendulum-v1', TINY_SAC, replay,
                               with_variables=False)
  server = reverb.Server(served, port=free_port())
  address = f'localhost:{server.port}'
  try:
    client = reverb.Client(address)
    signature = client.server_info()[table_names.REPLAY_TABLE].signature
    assert agents.is_packed(signature)
    # Pendulum: step type, 3 observations, 1 action, next step type,
    # reward, discount.
    assert signature.shape.as_list() == [2, 8]
    assert 'replay_layout' in config_lib.contract_flags()
    contract.publish(client, {'env': 'Pendulum-v1',
                              'replay_layout': 'packed'})
    with pytest.raises(UserError, match=(
        r'^--replay_layout=stock here, but the replay server at \S+ runs '
        r'--replay_layout=packed')):
      contract.check(address, {'env': 'Pendulum-v1',
                               'replay_layout': 'stock'}, 'learner')
  finally:
    server.stop()
