"""The actor's environments in subprocesses, and the batched env loop.

The subprocess environments run in a real actor process against a real replay
server; the env loop's trajectories are compared with TF-Agents' PyDriver's.
(Moved from tests/test_lean_actor.py, whose NumPy-policy and writer parity
checks are now tests/test_compat.py.)
"""

import os
import re
import signal
import time

import numpy as np
import reverb
import tensorflow as tf
from tf_agents.environments import py_environment
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

from common import agents
from common import config as config_lib
from common import table_names
from common import environments
from launcher.local_cluster import TINY, free_port, table_size
from variable_container.client import VariableContainerClient


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
  address = _start(cluster, tmp_path, 'tests.test_env_processes:who_env',
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
  address = _start(cluster, tmp_path, 'tests.test_env_processes:who_env',
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
  _start(cluster, tmp_path, 'tests.test_env_processes:exploding_env',
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
  from actor import env_loop  # pylint: disable=g-import-not-at-top
  from actor import env_processes  # pylint: disable=g-import-not-at-top

  class StepPyPolicy(py_policy.PyPolicy):

    def _action(self, time_step, policy_state):
      return policy_step.PolicyStep(
          np.array([time_step.observation[2] / 10], np.float32), (), ())

  name = 'tests.test_env_processes:who_env'
  options = config_lib.EnvOptions()
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
      collector = env_loop.Collector(envs, [w.append for w in written])
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
