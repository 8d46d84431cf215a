"""Chaos: every role killed with SIGKILL mid-run, and the run goes on.

Separate OS processes on localhost, Pendulum with tiny networks.
"""

import re
import signal
import time

from tests.cluster import TINY, free_port, table_size


def _flags(address, train_steps):
  return ['--env=Pendulum-v1', f'--replay_address={address}',
          '--replay_capacity=20000', '--min_size_to_sample=100',
          '--initial_collect_steps=100', f'--train_steps={train_steps}',
          '--num_actors=2', '--push_interval_steps=20',
          '--pull_interval_steps=20', '--policy_save_interval=100000',
          '--checkpoint_interval_steps=200', '--log_interval_s=1'] + TINY


def _train_steps(log):
  return [int(s) for s in re.findall(r'learner: train_step (\d+)/', log)]


def _wait_train_step(cluster, name, at_least, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = _train_steps(cluster.log(name))
    if steps and steps[-1] >= at_least:
      return steps[-1]
    assert cluster.procs[name].poll() is None, cluster.tail(name)
    time.sleep(0.5)
  raise AssertionError(f'{name} did not reach train_step {at_least}:\n'
                       f'{cluster.tail(name)}')


def test_learner_killed_resumes_from_its_checkpoint(cluster, tmp_path):
  port = free_port()
  flags = _flags(f'localhost:{port}', 2000)
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  for task in range(2):
    cluster.start(f'actor_{task}', 'actor', flags + [
        f'--task={task}', f'--root_dir={tmp_path}/actors'])
  learner_flags = flags + [f'--root_dir={tmp_path}/learner']
  cluster.start('learner', 'learner', learner_flags)
  cluster.wait_for_log('learner', r'Saved checkpoint: .*ckpt-(4|5|6|7)\d\d',
                       240)
  cluster.signal('learner', signal.SIGKILL)
  cluster.wait('learner', 10)
  saved = [int(s) for s in re.findall(r'Saved checkpoint: .*ckpt-(\d+)',
                                      cluster.log('learner'))]
  last_saved = max(saved)

  cluster.start('learner_again', 'learner', learner_flags)
  resumed = int(cluster.wait_for_log(
      'learner_again', r'resumed from checkpoint at train_step (\d+)',
      120).group(1))
  assert resumed >= last_saved > 0
  # Weights go out before the first new train step.
  pushed = int(cluster.wait_for_log(
      'learner_again', r'pushed initial weights \(train_step (\d+)\)',
      60).group(1))
  assert pushed == resumed
  assert cluster.wait('learner_again', 300) == 0, cluster.tail('learner_again')
  assert re.search(rf'finished at train_step 2000 \(started at {resumed}\)',
                   cluster.log('learner_again'))
  for task in range(2):
    assert cluster.wait(f'actor_{task}', 60) == 0


def test_actor_killed_learner_goes_on_and_restarted_actor_rejoins(
    cluster, tmp_path):
  port = free_port()
  # Long enough that a restarted actor (about 10 s to start) finds the
  # learner still training.
  flags = _flags(f'localhost:{port}', 15000)
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('learner', 'learner', flags + [f'--root_dir={tmp_path}/l'])
  actor_flags = {task: flags + [f'--task={task}', f'--root_dir={tmp_path}/a']
                 for task in range(2)}
  for task in range(2):
    cluster.start(f'actor_{task}', 'actor', actor_flags[task])
  _wait_train_step(cluster, 'learner', 300, 240)
  cluster.signal('actor_1', signal.SIGKILL)
  cluster.wait('actor_1', 10)
  at_kill = _train_steps(cluster.log('learner'))[-1]
  # The learner keeps training on the surviving actor's data.
  _wait_train_step(cluster, 'learner', at_kill + 300, 120)

  cluster.start('actor_1_again', 'actor', actor_flags[1])
  m = cluster.wait_for_log(
      'actor_1_again', r'acting with weights of train_step (\d+)', 120)
  assert int(m.group(1)) > at_kill
  assert 'random initial collect' not in cluster.log('actor_1_again')
  assert cluster.wait('learner', 400) == 0, cluster.tail('learner')
  for name in ('actor_0', 'actor_1_again'):
    assert cluster.wait(name, 60) == 0, cluster.tail(name)


def test_replay_server_killed_restores_and_clients_continue(cluster,
                                                            tmp_path):
  port = free_port()
  address = f'localhost:{port}'
  flags = _flags(address, 2500)
  server_flags = flags + [f'--port={port}',
                          f'--checkpoint_dir={tmp_path}/replay',
                          '--checkpoint_interval_s=2']
  cluster.start('replay_server', 'replay_server', server_flags)
  cluster.start('learner', 'learner', flags + [f'--root_dir={tmp_path}/l'])
  for task in range(2):
    cluster.start(f'actor_{task}', 'actor', flags + [
        f'--task={task}', f'--root_dir={tmp_path}/a'])
  _wait_train_step(cluster, 'learner', 400, 240)
  cluster.wait_for_log('replay_server', r'checkpoint \(periodic\) written', 30)
  time.sleep(2.5)  # Past another checkpoint.
  cluster.signal('replay_server', signal.SIGKILL)
  cluster.wait('replay_server', 10)
  checkpointed = [int(n) for n in re.findall(
      r'checkpoint \(periodic\) written .*uniform_table=(\d+)',
      cluster.log('replay_server'))]
  at_kill = _train_steps(cluster.log('learner'))[-1]
  time.sleep(3)  # An outage the clients must notice and ride out.

  cluster.start('replay_server_again', 'replay_server', server_flags)
  restored = int(cluster.wait_for_log(
      'replay_server_again', r'restored: uniform_table=(\d+)', 120).group(1))
  assert restored >= checkpointed[-1] > 0
  assert table_size(address) >= checkpointed[-1]
  # The same learner and actors (never restarted) carry on to the end.
  assert cluster.wait('learner', 400) == 0, cluster.tail('learner')
  assert _train_steps(cluster.log('learner'))[-1] > at_kill
  assert re.search(r'finished at train_step 2500 \(started at 0\)',
                   cluster.log('learner'))
  for task in range(2):
    assert cluster.wait(f'actor_{task}', 120) == 0, cluster.tail(
        f'actor_{task}')
