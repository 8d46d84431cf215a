"""The actor's lean collect path: NumPy collect policies, environment subprocesses.

The NumPy policies are compared with TF-Agents' own policies on the same
(random, non-zero) weights; the subprocess environments run in a real actor
process against a real replay server.
"""

import os
import re
import signal
import time

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
from common import config as config_lib
from common import table_names
from common import environments
from tests.cluster import TINY, free_port, table_size
from variable_container import VariableContainerClient


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
    distribution, _ = agent._actor_network(  # pylint: disable=protected-access
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
      'Pendulum-v1', options=environments.EnvOptions(discretize_actions=5))


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

    q_values, _ = agent._q_network(  # pylint: disable=protected-access
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


_PID_SCALE = 2.0**22  # Linux's largest pid_max.


class _WhoEnv(py_environment.PyEnvironment):
  """Observations say who made them: (pid / 2**22, seed, step) (exact in
  float32, and small for the network); 10-step episodes.

  With `fail_at_step`, its step raises there (a simulator that breaks).
  """

  def __init__(self, fail_at_step: int = 0):
    super().__init__(handle_auto_reset=True)
    self._seed = -1
    self._t = 0
    self._steps = 0
    self._fail_at_step = fail_at_step

  def seed(self, seed):
    self._seed = seed

  def observation_spec(self):
    return array_spec.ArraySpec((3,), np.float32, 'observation')

  def action_spec(self):
    return array_spec.BoundedArraySpec((1,), np.float32, -1.0, 1.0, 'action')

  def _observation(self):
    return np.array([os.getpid() / _PID_SCALE, self._seed, self._t],
                    np.float32)

  def _reset(self):
    self._t = 0
    return ts.restart(self._observation())

  def _step(self, action):
    self._t += 1
    self._steps += 1
    if self._fail_at_step and self._steps >= self._fail_at_step:
      raise RuntimeError('the simulator exploded')
    if self._t >= 10:
      return ts.termination(self._observation(), np.float32(0))
    return ts.transition(self._observation(), np.float32(1))


def who_env():
  return _WhoEnv()


def exploding_env():
  return _WhoEnv(fail_at_step=30)


_TINY_SAC = config_lib.SacConfig(actor_fc_layers=(32, 32),
                                 critic_joint_fc_layers=(32, 32),
                                 batch_size=32)


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _start(cluster, tmp_path, env, actor_flags):
  port = free_port()
  address = f'localhost:{port}'
  flags = [f'--env={env}', f'--replay_address={address}',
           '--rate_limiter=min_size', '--min_size_to_sample=1',
           '--replay_capacity=100000', '--validate_env_episodes=0'] + TINY
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.wait_for_log('replay_server', 'serving tables', 120)
  # Weights at train_step 1: the actor acts with the (NumPy) collect policy.
  environment = environments.load_environment(env)
  agent = agents.create_agent(environment, _TINY_SAC)
  variables = agents.shared_variables(agent, agent.train_step_counter)
  agent.train_step_counter.assign(1)
  VariableContainerClient(address, variables, 60).push(variables)
  cluster.start('actor', 'actor', flags + [
      '--initial_collect_steps=0', '--max_train_steps=1000000',
      '--pull_interval_steps=20', f'--root_dir={tmp_path}/a'] + actor_flags)
  return address


def _who_wrote(address, num_items=300):
  """(pid, seed) of the environments whose steps are in sampled items."""
  client = reverb.Client(address)
  writers = set()
  for sample in client.sample(table_names.REPLAY_TABLE, num_samples=num_items,
                              emit_timesteps=False,
                              unpack_as_table_signature=True):
    observation = np.asarray(sample.data.observation)
    # Two consecutive steps of one environment (a boundary item's second
    # step is the next episode's first).
    assert (observation[0, :2] == observation[1, :2]).all(), observation
    assert (observation[1, 2] == observation[0, 2] + 1 or
            observation[1, 2] == 0), observation
    writers.add((int(round(observation[0, 0] * _PID_SCALE)),
                 int(observation[0, 1])))
  return writers


def test_env_processes_collect_from_every_environment(cluster, tmp_path):
  """--env_processes=2 --envs_per_actor=2: four environments in two
  subprocesses write to the table; SIGTERM stops the actor and them."""
  address = _start(cluster, tmp_path, 'tests.test_lean_actor:who_env',
                   ['--env_processes=2', '--envs_per_actor=2'])
  cluster.wait_for_log('actor', 'acting with weights of train_step 1', 180)
  deadline = time.monotonic() + 60
  while (table_size(address) or 0) < 400:
    assert time.monotonic() < deadline, cluster.tail('actor')
    time.sleep(0.5)
  writers = _who_wrote(address)
  actor_pid = cluster.procs['actor'].pid
  pids = {pid for pid, _ in writers}
  assert len(pids) == 2 and actor_pid not in pids, (writers, actor_pid)
  # Four distinct seeds, two per subprocess.
  assert len({seed for _, seed in writers}) == 4, writers
  assert all(_alive(pid) for pid in pids)
  cluster.signal('actor', signal.SIGTERM)
  assert cluster.wait('actor', 60) == 0, cluster.tail('actor')
  m = re.search(r'stop requested; (\d+) env steps, (\d+) episodes',
                cluster.log('actor'))
  assert m and int(m.group(1)) >= 400 and int(m.group(2)) >= 40, (
      cluster.tail('actor'))
  assert 'Traceback' not in cluster.log('actor')
  assert not [pid for pid in pids if _alive(pid)]


def test_killed_actor_leaves_no_env_process(cluster, tmp_path):
  address = _start(cluster, tmp_path, 'tests.test_lean_actor:who_env',
                   ['--env_processes=2'])
  cluster.wait_for_log('actor', 'acting with weights of train_step 1', 180)
  deadline = time.monotonic() + 60
  while (table_size(address) or 0) < 100:
    assert time.monotonic() < deadline, cluster.tail('actor')
    time.sleep(0.5)
  pids = {pid for pid, _ in _who_wrote(address, 100)}
  assert len(pids) == 2
  cluster.procs['actor'].kill()  # The actor alone, not its process group.
  cluster.procs['actor'].wait(10)
  deadline = time.monotonic() + 10
  while any(_alive(pid) for pid in pids):
    assert time.monotonic() < deadline, 'env subprocesses outlived the actor'
    time.sleep(0.2)


def test_env_failing_in_subprocess_is_one_line(cluster, tmp_path):
  _start(cluster, tmp_path, 'tests.test_lean_actor:exploding_env',
         ['--env_processes=2'])
  assert cluster.wait('actor', 180) == 2, cluster.tail('actor')
  log = cluster.log('actor')
  assert re.search(r'actor: error: environment in subprocess \d failed: '
                   r'RuntimeError: the simulator exploded', log), log[-3000:]
  assert 'Traceback' not in log


class _StepPolicy:
  """Acts with observation[2] / 10 (the step): actions say when they were
  chosen."""

  def __call__(self, time_steps):
    return np.array([[t.observation[2] / 10] for t in time_steps],
                    np.float32), ()


def test_collector_writes_what_tf_agents_driver_writes():
  """Per environment, the trajectories of TF-Agents' PyDriver, in process
  and with environments in subprocesses (boundaries included)."""
  from tf_agents.drivers import py_driver  # pylint: disable=g-import-not-at-top
  from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top
  from tf_agents.policies import py_policy  # pylint: disable=g-import-not-at-top
  from tf_agents.trajectories import policy_step  # pylint: disable=g-import-not-at-top
  from actor import collector as collector_lib  # pylint: disable=g-import-not-at-top
  from actor import env_processes  # pylint: disable=g-import-not-at-top

  class StepPyPolicy(py_policy.PyPolicy):

    def _action(self, time_step, policy_state):
      return policy_step.PolicyStep(
          np.array([time_step.observation[2] / 10], np.float32), (), ())

  name = 'tests.test_lean_actor:who_env'
  options = environments.EnvOptions()
  steps = 45  # Four episodes of ten steps and their boundaries, and more.
  expected = []
  for seed in range(4):
    env = wrappers.RunStats(environments.load_environment(name, seed=seed))
    written = []
    py_driver.PyDriver(env, StepPyPolicy(env.time_step_spec(),
                                         env.action_spec()),
                       [written.append], max_steps=steps).run(env.reset())
    expected.append(written)

  def without_pid(t):
    return t._replace(observation=t.observation[1:])

  for envs in (env_processes.InProcessEnvironments(name, range(4), options),
               env_processes.EnvironmentProcesses(name, [[0, 1], [2, 3]],
                                                  options)):
    try:
      written = [[] for _ in range(4)]
      collector = collector_lib.Collector(envs, [w.append for w in written])
      # Subprocesses step independently: some may be ahead of others.
      while min(len(w) for w in written) < len(expected[0]):
        collector.run(_StepPolicy(), 1)
      for ours, theirs in zip(written, expected):
        for a, b in zip(ours, theirs):
          tf.nest.map_structure(np.testing.assert_array_equal,
                                without_pid(a), without_pid(b))
      assert envs.episodes >= 16
    finally:
      envs.close()
