"""Replay shard 0 is no single point of failure (issue 18, point 8).

Every shard serves the variables: the learner pushes weights and train_step
to all of them, each actor reads its own shard, and the `--task=auto`
indices of shard k are those i with i mod S == k. Killing the first shard
stops only what lived on it: its items and the actor writing to it.
"""

import re
import signal
import time

import reverb

from common import reverb_connection
from common import table_names
from launcher.local_cluster import free_port
from variable_container import one_value


def _published_step(address: str):
  try:
    return one_value.published_train_step(reverb.Client(address),
                                          timeout_s=2.0)
  except Exception:  # pylint: disable=broad-except
    return None


def _wait_until(condition, timeout_s: float, what: str, tail=lambda: ''):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(0.5)
  raise AssertionError(f'{what} within {timeout_s:g}s\n{tail()}')


def _acted_steps(log: str):
  return [int(s) for s in re.findall(r'acting with weights of train_step (\d+)',
                                     log)]


def test_learner_and_other_actor_survive_the_first_shard(cluster):
  ports = [free_port(), free_port()]
  addresses = [f'localhost:{p}' for p in ports]
  flags = [
      '--env=CartPole-v0', '--agent=dqn', '--q_fc_layers=32',
      '--replay_capacity=5000', '--min_size_to_sample=100',
      '--initial_collect_steps=200', '--num_actors=2',
      '--rate_limiter=min_size', f'--replay_address={",".join(addresses)}',
      '--train_steps=1000000', '--server_timeout_s=120', '--log_interval_s=1']

  def start_shard(shard):
    cluster.start(f'server_{shard}', 'replay_server',
                  flags + [f'--port={ports[shard]}'])

  for shard in range(2):
    start_shard(shard)
  for task in range(2):
    cluster.start(f'actor_{task}', 'actor', flags + [
        f'--task={task}', f'--root_dir={cluster.log_dir}/actor',
        '--pull_interval_steps=20'])
  cluster.start('learner', 'learner', flags + [
      f'--root_dir={cluster.log_dir}/learner', '--push_interval_steps=20',
      '--policy_save_interval=1000000'])
  cluster.wait_for_log('learner', r'train_step [1-9]\d{2,}/', 240)
  # Both shards hold the weights.
  for address in addresses:
    _wait_until(lambda a=address: _published_step(a), 30,
                f'no train_step published on {address}')

  cluster.signal('server_0', signal.SIGKILL)
  cluster.wait('server_0', 10)
  killed_at = _published_step(addresses[1])
  acted = _acted_steps(cluster.log('actor_1'))
  # The learner trains on and its pushes reach the live shard ...
  _wait_until(lambda: (_published_step(addresses[1]) or 0) >= killed_at + 200,
              120, 'the learner stopped pushing to shard 1 after shard 0 died',
              lambda: cluster.tail('learner'))
  # ... and the actor of shard 1 acts on them.
  _wait_until(
      lambda: max(_acted_steps(cluster.log('actor_1')) or [0]) >=
      max(acted or [0]) + 100, 120,
      'actor 1 got no new weights after shard 0 died',
      lambda: cluster.tail('actor_1'))
  assert cluster.procs['learner'].poll() is None, cluster.tail('learner')
  assert cluster.procs['actor_1'].poll() is None, cluster.tail('actor_1')

  # Shard 0 back, empty: it gets the weights again without a restart.
  start_shard(0)
  # Its own start first (a TF import: minutes on a loaded CI machine).
  reverb_connection.wait_for_server(addresses[0], 300, 'test')

  def weights_on_shard_0():
    if not _published_step(addresses[0]):
      return False
    info = reverb.Client(addresses[0]).server_info(timeout=10)
    return info[table_names.VARIABLE_TABLE].current_size == 1

  _wait_until(weights_on_shard_0, 120,
              'the restarted shard 0 never got the weights and their step',
              lambda: cluster.tail('learner'))
  cluster.signal('learner')
  assert cluster.wait('learner', 60) == 0, cluster.tail('learner')
