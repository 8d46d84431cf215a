"""Parity of the fast paths built on `common.compat` with the libraries' own.

`common/compat.py` touches private attributes of TF-Agents and Reverb; these
checks fail when an upgrade changes what they mean. The NumPy collect
policies are compared with TF-Agents' own policies on the same (random,
non-zero) weights; the actors' trajectory writer with TF-Agents'
`ReverbAddTrajectoryObserver` on the same steps. (The environment-subprocess
tests that shared tests/test_lean_actor.py are in tests/test_env_processes.py.)
"""

import numpy as np
import reverb
import tensorflow as tf
from tf_agents.environments import py_environment
from tf_agents.policies import greedy_policy
from tf_agents.replay_buffers import reverb_utils
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories import trajectory

from actor.writer import StoppableTrajectoryObserver
from common import agents
from common import compat
from common import config as config_lib
from common import table_names
from common import environments
from launcher.local_cluster import free_port


class _SpecOnlyEnv(py_environment.PyEnvironment):
  """Just specs: an agent is built from them, the policies never step it."""

  def __init__(self, action_spec, observation_size=5):
    super().__init__()
    self._action_spec = action_spec
    self._observation_spec = array_spec.ArraySpec((observation_size,),
                                                  np.float32, 'observation')

  def observation_spec(self):
    return self._observation_spec

  def action_spec(self):
    return self._action_spec

  def _reset(self):
    raise NotImplementedError

  def _step(self, action):
    raise NotImplementedError


def _randomize(variables, seed):
  """Random weights, biases included (an initialized network has zero biases)."""
  rng = np.random.default_rng(seed)
  for v in variables:
    v.assign(rng.normal(0, 0.5, v.shape).astype(v.dtype.as_numpy_dtype))


def _time_steps(observations):
  batch = len(observations)
  return ts.TimeStep(
      step_type=tf.fill([batch], ts.StepType.MID),
      reward=tf.zeros([batch]), discount=tf.ones([batch]),
      observation=tf.constant(observations))


def _observations(size, batch=6, seed=1):
  return np.random.default_rng(seed).normal(0, 2, (batch, size)).astype(
      np.float32)


def _sac_cases():
  yield environments.load_environment('Pendulum-v1')
  # Bounds not centred on 0, different per dimension.
  yield _SpecOnlyEnv(array_spec.BoundedArraySpec(
      (3,), np.float32, minimum=[0.0, -1.0, 2.0], maximum=[3.0, 0.5, 2.5]))


def test_numpy_sac_collect_policy_matches_tf():
  for env in _sac_cases():
    config = config_lib.SacConfig(actor_fc_layers=(16, 8))
    agent = agents.create_agent(env, config)
    _randomize(agent.collect_policy.variables(), seed=3)
    policy = agents.numpy_collect_policy(agent, config, seed=0)
    assert policy is not None
    policy.refresh()
    size = env.observation_spec().shape[0]
    observations = _observations(size)

    # The Gaussian before the tanh.
    distribution, _ = compat.sac_actor_network(agent)(
        tf.constant(observations), step_type=(), network_state=(),
        training=False)
    means, stds = policy.normal(observations)
    np.testing.assert_allclose(
        means, distribution.input_distribution.loc.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        stds, distribution.input_distribution.stddev().numpy(), rtol=1e-5)
    assert stds.std() > 0.01  # Not all equal: the weights matter.

    # The deterministic mode (squashed means, scaled to the spec).
    greedy = greedy_policy.GreedyPolicy(agent.collect_policy)
    np.testing.assert_allclose(
        policy.mode(observations),
        greedy.action(_time_steps(observations)).action.numpy(), atol=1e-5)

    # Samples: the same distribution of squashed actions per observation.
    repeats = 20000
    many = np.repeat(observations[:2], repeats, axis=0)
    tf_actions = agent.collect_policy.action(_time_steps(many)).action.numpy()
    np_actions = policy(many)
    assert np_actions.dtype == tf_actions.dtype == np.float32
    assert np_actions.shape == tf_actions.shape
    spec = env.action_spec()
    assert np.all(np_actions >= spec.minimum)
    assert np.all(np_actions <= spec.maximum)
    for i in range(2):
      ours = np_actions[i * repeats:(i + 1) * repeats]
      theirs = tf_actions[i * repeats:(i + 1) * repeats]
      scale = (np.asarray(spec.maximum) - np.asarray(spec.minimum)) / 2
      np.testing.assert_allclose(ours.mean(0), theirs.mean(0),
                                 atol=0.03 * np.max(scale))
      np.testing.assert_allclose(ours.std(0), theirs.std(0),
                                 atol=0.03 * np.max(scale))
      # And the same distribution functions (tanh piles mass at the bounds:
      # compared at points, not at quantiles).
      middle = (np.asarray(spec.maximum) + np.asarray(spec.minimum)) / 2
      for point in (middle - scale / 2, middle, middle + scale / 2):
        np.testing.assert_allclose(np.mean(ours <= point, axis=0),
                                   np.mean(theirs <= point, axis=0),
                                   atol=0.02)

    # A pull changes the variables: refresh() picks the new values up.
    before = policy.mode(observations)
    _randomize(agent.collect_policy.variables(), seed=4)
    np.testing.assert_array_equal(policy.mode(observations), before)
    policy.refresh()
    np.testing.assert_allclose(
        policy.mode(observations),
        greedy.action(_time_steps(observations)).action.numpy(), atol=1e-5)


def _dqn_cases():
  yield environments.load_environment('CartPole-v0')
  yield environments.load_environment(
      'Pendulum-v1', options=config_lib.EnvOptions(discretize_actions=5))


def test_numpy_dqn_collect_policy_matches_tf():
  for env in _dqn_cases():
    config = config_lib.DqnConfig(q_fc_layers=(16, 8), epsilon_greedy=0.3)
    agent = agents.create_agent(env, config)
    _randomize(agent.collect_policy.variables(), seed=5)
    policy = agents.numpy_collect_policy(agent, config, seed=0)
    assert policy is not None
    policy.refresh()
    size = env.observation_spec().shape[0]
    observations = _observations(size, batch=20)

    q_values, _ = compat.dqn_q_network(agent)(
        tf.constant(observations), network_state=())
    np.testing.assert_allclose(policy.q_values(observations),
                               q_values.numpy(), rtol=1e-5, atol=1e-5)
    greedy = agent.policy.action(_time_steps(observations)).action.numpy()
    assert len(set(greedy.tolist())) > 1  # The observations matter.
    np.testing.assert_array_equal(policy.greedy(observations), greedy)

    # Epsilon-greedy: a uniformly random action with probability epsilon.
    repeats = 20000
    many = np.repeat(observations[:1], repeats, axis=0)
    tf_actions = agent.collect_policy.action(_time_steps(many)).action.numpy()
    np_actions = policy(many)
    assert np_actions.dtype == tf_actions.dtype
    assert np_actions.shape == tf_actions.shape
    spec = env.action_spec()
    num_actions = int(spec.maximum) - int(spec.minimum) + 1
    # Random actions hit the greedy one 1/num_actions of the time.
    expected = config.epsilon_greedy * (num_actions - 1) / num_actions
    for actions in (np_actions, tf_actions):
      assert abs(np.mean(actions != greedy[0]) - expected) < 0.015
      counts = np.bincount(actions.ravel() - int(spec.minimum),
                           minlength=num_actions)
      assert len(counts) == num_actions


def test_agent_without_numpy_policy_has_none():
  """The linear-Q agent of test_replay has no numpy policy: the TF fallback."""
  import types  # pylint: disable=g-import-not-at-top
  module = types.ModuleType('no_numpy_agent')
  for name in ('create', 'collect_config', 'train_with_td_errors',
               'greedy_policy', 'collect_policy'):
    setattr(module, name, lambda *a: None)

  class _Config:
    pass

  agents.register(_Config, module)
  assert agents.numpy_collect_policy(object(), _Config()) is None


def _episode(episode: int, length: int):
  """`length` trajectories and the boundary; observation = (episode, step)."""
  act = np.zeros(1, np.float32)
  obs = lambda t: np.array([episode, t], np.float32)
  steps = [trajectory.first(obs(0), act, (), np.float32(0.5), np.float32(1))]
  steps += [trajectory.mid(obs(t), act, (), np.float32(t), np.float32(1))
            for t in range(1, length - 1)]
  steps[-1] = steps[-1]._replace(next_step_type=np.int32(2))  # LAST next.
  steps.append(trajectory.boundary(obs(length - 1), act, (), np.float32(0),
                                   np.float32(1)))
  return steps


def _drain(client, table):
  items = []
  while client.server_info()[table].current_size:
    for sample in client.sample(table, num_samples=1, emit_timesteps=False,
                                unpack_as_table_signature=True):
      items.append((float(sample.info.priority),
                    tf.nest.map_structure(np.asarray, sample.data)))
  return items


def test_writer_writes_the_items_tf_agents_observer_writes():
  """Same steps into TF-Agents' observer and ours: the same items."""
  spec = trajectory.Trajectory(
      step_type=tf.TensorSpec((), tf.int32),
      observation=tf.TensorSpec((2,), tf.float32),
      action=tf.TensorSpec((1,), tf.float32), policy_info=(),
      next_step_type=tf.TensorSpec((), tf.int32),
      reward=tf.TensorSpec((), tf.float32),
      discount=tf.TensorSpec((), tf.float32))
  for length in (2, 3):  # 1-step and 2-step (N-step DQN) items.
    signature = tf.nest.map_structure(
        lambda s, n=length: tf.TensorSpec((n,) + tuple(s.shape), s.dtype),
        spec)
    tables = [reverb.Table.queue(name, 10000, signature=signature)
              for name in (table_names.REPLAY_TABLE, 'stock')]
    server = reverb.Server(tables, port=free_port())
    client = reverb.Client(f'localhost:{server.port}')
    try:
      ours = StoppableTrajectoryObserver(client, lambda: False, length)
      stock = reverb_utils.ReverbAddTrajectoryObserver(
          client, 'stock', sequence_length=length, stride_length=1)
      for episode, steps in enumerate((5, 1, 2, 3, 7, 4)):
        if episode == 3:
          ours.update_priority(2.5)
          stock._priority = 2.5  # pylint: disable=protected-access
        for i, step in enumerate(_episode(episode, steps)):
          if episode == 4 and i == 3:  # A partial episode, dropped.
            ours.discard_partial_episode()
            stock.reset(write_cached_steps=False)
          ours(step)
          stock(step)
      ours.flush()
      stock.flush()
      mine, theirs = (_drain(client, table_names.REPLAY_TABLE),
                      _drain(client, 'stock'))
      assert len(mine) == len(theirs) >= 9
      for (p1, d1), (p2, d2) in zip(mine, theirs):
        assert p1 == p2
        tf.nest.map_structure(np.testing.assert_array_equal, d1, d2)
      assert {p for p, _ in mine} == {1.0, 2.5}
      # No item spans two episodes.
      assert all(d.observation[0, 0] == d.observation[-1, 0]
                 for _, d in mine)
    finally:
      server.stop()


def test_evaluators_numpy_greedy_policy_acts_as_tf_agents_greedy_policy():
  """The evaluator's greedy policy in NumPy takes TF-Agents' greedy actions
  on a real environment's time steps (SAC on Pendulum, DQN on CartPole)."""
  from tf_agents.policies import py_tf_eager_policy  # pylint: disable=g-import-not-at-top
  from actor import evaluate  # pylint: disable=g-import-not-at-top
  cases = [('Pendulum-v1', config_lib.SacConfig(actor_fc_layers=(16, 8))),
           ('CartPole-v0', config_lib.DqnConfig(q_fc_layers=(16, 8)))]
  for name, config in cases:
    env = environments.load_environment(name, seed=0)
    agent = agents.create_agent(env, config)
    _randomize(agent.collect_policy.variables(), seed=7)
    numpy_greedy = agents.numpy_greedy_policy(agent, config)
    assert numpy_greedy is not None, name
    ours = evaluate._NumpyPyPolicy(  # pylint: disable=protected-access
        env.time_step_spec(), env.action_spec(), numpy_greedy)
    theirs = py_tf_eager_policy.PyTFEagerPolicy(
        greedy_policy.GreedyPolicy(agents.greedy_policy(agent, config)))
    numpy_greedy.refresh()
    time_step, actions = env.reset(), []
    for _ in range(30):
      action = ours.action(time_step).action
      np.testing.assert_allclose(action, theirs.action(time_step).action,
                                 atol=1e-5)
      assert action.dtype == env.action_spec().dtype
      assert action.shape == env.action_spec().shape
      actions.append(action)
      time_step = env.step(action)
    if name == 'Pendulum-v1':  # CartPole's two actions may all be one.
      assert np.std(actions) > 0.01  # The observations matter.
    # New weights are taken in by refresh(), as after a pull.
    _randomize(agent.collect_policy.variables(), seed=8)
    numpy_greedy.refresh()
    np.testing.assert_allclose(ours.action(time_step).action,
                               theirs.action(time_step).action, atol=1e-5)
