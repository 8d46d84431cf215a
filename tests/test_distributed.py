"""End to end: replay_server, learner and actors as separate OS processes."""

import re
import time

from launcher.local_cluster import TINY, free_port, table_size


def _max_weights_step(log: str) -> int:
  steps = [int(s) for s in re.findall(r'weights of train_step (\d+)', log)]
  return max(steps, default=-1)


def test_minitaur_cluster_started_clients_first(cluster, tmp_path):
  """Actors, then the learner, then the server: the clients wait, then train.

  The actors are started alike (`--task=auto`), as replicas are, and take
  distinct indices from the server.
  """
  port = free_port()
  address = f'localhost:{port}'
  train_steps = 300
  flags = ['--env=MinitaurBulletEnv-v0', f'--replay_address={address}',
           '--replay_capacity=5000', '--min_size_to_sample=200',
           '--initial_collect_steps=200', f'--train_steps={train_steps}',
           '--num_actors=2', '--push_interval_steps=20',
           '--pull_interval_steps=20', '--policy_save_interval=100000'] + TINY
  # Reverse order: actors, then the learner, then the server.
  for task in range(2):
    cluster.start(f'actor_{task}', 'actor',
                  flags + ['--task=auto', f'--root_dir={tmp_path}/a'])
    cluster.wait_for_log(f'actor_{task}',
                         f'waiting for Reverb server at {address}', 120)
  cluster.start('learner', 'learner', flags + [f'--root_dir={tmp_path}/l'])
  # Each client keeps retrying: it logs the wait again after 5 s (and the
  # actors, started first, have waited at least as long by then).
  cluster.wait_for_log(
      'learner', rf'waiting for Reverb server at {address} \([1-9]\d*s of',
      120)
  for name in ('learner', 'actor_0', 'actor_1'):
    assert cluster.procs[name].poll() is None, cluster.tail(name)

  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  sizes = []
  deadline = time.monotonic() + 300
  while cluster.procs['learner'].poll() is None:
    assert time.monotonic() < deadline, cluster.tail('learner')
    size = table_size(address)
    if size is not None and (not sizes or size != sizes[-1]):
      sizes.append(size)
    time.sleep(0.3)

  assert cluster.wait('learner', 10) == 0, cluster.tail('learner')
  finished = re.search(r'finished at train_step (\d+) \(started at 0\)',
                       cluster.log('learner'))
  assert finished and int(finished.group(1)) >= train_steps
  # The table grew while the cluster ran: several distinct, rising sizes.
  assert len(sizes) >= 3 and sizes[-1] > sizes[0] and sizes[-1] >= 200, sizes
  indices = set()
  for task in range(2):
    name = f'actor_{task}'
    assert cluster.wait(name, 60) == 0, cluster.tail(name)
    indices.add(int(re.search(r'actor (\d+): took index', cluster.log(name)
                              ).group(1)))
    log = cluster.log(name)
    # Weights flowed learner -> server -> this actor.
    assert _max_weights_step(log) > 0, cluster.tail(name)
    assert 'training finished' in log
  assert indices == {0, 1}
  assert table_size(address) >= sizes[-1]


def test_actor_gives_up_on_missing_server(cluster, tmp_path):
  """No server: a one-line error and a non-zero exit after the timeout."""
  port = free_port()
  start = time.monotonic()
  cluster.start('actor', 'actor', ['--env=Pendulum-v1',
                                   f'--replay_address=localhost:{port}',
                                   '--server_timeout_s=3',
                                   f'--root_dir={tmp_path}'])
  code = cluster.wait('actor', 60)
  elapsed = time.monotonic() - start
  assert code != 0
  log = cluster.log('actor')
  errors = [l for l in log.splitlines() if l.startswith('actor: error:')]
  assert len(errors) == 1, log
  assert f'localhost:{port} did not answer within 3s' in errors[0]
  assert 'Traceback' not in log
  assert elapsed < 45


def test_actor_steps_several_environments_together(cluster, tmp_path):
  """--envs_per_actor=3: one batched policy call per step of three envs."""
  _several_envs(cluster, tmp_path, 'Pendulum-v1', train_steps=900,
                episodes=3)


def test_minitaur_actor_steps_several_environments_together(cluster,
                                                            tmp_path):
  """Minitaur writes into its action array: the batch must reach it as numpy."""
  _several_envs(cluster, tmp_path, 'MinitaurBulletEnv-v0', train_steps=300,
                episodes=0)


def _several_envs(cluster, tmp_path, env, train_steps, episodes):
  port = free_port()
  address = f'localhost:{port}'
  flags = [f'--env={env}', f'--replay_address={address}',
           '--replay_capacity=5000', '--min_size_to_sample=100',
           '--initial_collect_steps=150', f'--train_steps={train_steps}',
           '--push_interval_steps=50', '--pull_interval_steps=30',
           '--policy_save_interval=100000'] + TINY
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('learner', 'learner', flags + [f'--root_dir={tmp_path}/l'])
  cluster.start('actor', 'actor', flags + ['--envs_per_actor=3',
                                           f'--root_dir={tmp_path}/a'])
  assert cluster.wait('learner', 300) == 0, cluster.tail('learner')
  assert cluster.wait('actor', 60) == 0, cluster.tail('actor')
  m = re.search(r'training finished; (\d+) env steps, (\d+) episodes',
                cluster.log('actor'))
  assert m, cluster.tail('actor')
  # One train step per env step after the first 100 items.
  assert int(m.group(1)) >= train_steps
  # Pendulum episodes are 200 steps: all three environments ended some.
  assert int(m.group(2)) >= episodes
  assert _max_weights_step(cluster.log('actor')) > 0
  assert table_size(address) >= train_steps - 100
