"""The learner as N workers under MultiWorkerMirroredStrategy (issue 20).

Each worker is its own OS process on localhost with one CPU replica; they
train one model in lockstep (ring all-reduce), worker 0 (the chief) alone
pushes and writes under --root_dir.
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import reverb

from common import table_names
from common.errors import UserError
from launcher.local_cluster import REPO_ROOT, TINY, free_port, wait_until
from learner import strategy as strategy_lib
from variable_container import one_value


def _workers(n: int = 2) -> str:
  return ','.join(f'localhost:{free_port()}' for _ in range(n))


def test_two_workers_give_one_learners_losses_and_identical_weights():
  """Same weights, same global batches: 2 workers (a slice of each batch
  each) give the losses of one default learner; after the steps both hold
  the same variables (see tests/mirrored_losses.py)."""
  workers = _workers()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'tests.mirrored_losses', '--agent', 'sac',
       '--multi_worker', workers, '--index', str(i)],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in (0, 1)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  chief, other = results
  single = chief  # Worker 0's one default learner, the reference.
  assert chief['multi_worker_replicas'] == other['multi_worker_replicas'] == 2
  for key in ('critic_loss', 'actor_loss'):
    a = np.array([row[key] for row in single['default']])
    for worker in (chief, other):
      b = np.array([row[key] for row in worker['multi_worker']])
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=key)
    assert np.ptp(a) > 1e-3, f'{key} never changed: {a}'
  assert chief['checksum'] == other['checksum']


def _flags(replay_port: int, train_steps: int, root: str):
  return ['--env=Pendulum-v1', f'--replay_address=localhost:{replay_port}',
          '--replay_capacity=5000', '--min_size_to_sample=100',
          '--initial_collect_steps=100', f'--train_steps={train_steps}',
          '--push_interval_steps=50', '--policy_save_interval=100000',
          '--checkpoint_interval_steps=100', '--worker_timeout_s=10',
          f'--root_dir={root}'] + TINY


def _start_group(cluster, flags, workers: str, tag: str = ''):
  for i in range(2):
    cluster.start(f'learner_{i}{tag}', 'learner', flags + [
        '--strategy=multi_worker', f'--learner_workers={workers}',
        f'--learner_index={i}'])


def _finished(log: str):
  m = re.search(r'finished at train_step (\d+) \(started at (\d+)\); .*'
                r'weights fingerprint (\w+)', log)
  assert m, log[-3000:]
  return int(m.group(1)), int(m.group(2)), m.group(3)


def test_two_workers_train_the_chief_pushes_and_a_lost_worker_ends_both(
    cluster, tmp_path):
  """Replay server, actor and 2 learner workers as separate processes. The
  group trains; one worker is killed: the other ends on its own with one
  line; restarted, the group resumes from the chief's checkpoint, trains to
  --train_steps, the chief pushes the final weights and both workers end
  with identical variables. On the packed replay layout
  (--replay_layout=packed), which a fast learner's pipeline wants."""
  port = free_port()
  flags = _flags(port, 100000, f'{tmp_path}/l') + ['--replay_layout=packed']
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('actor', 'actor', flags + [f'--root_dir={tmp_path}/a'])
  _start_group(cluster, flags, _workers())
  cluster.wait_for_log('learner_0', r'Saved checkpoint: .*ckpt-[1-9]', 400)
  assert 'batch 32 over 2 replica(s)' in cluster.log('learner_0')
  assert 'worker 0 of 2 (the chief' in cluster.log('learner_0')
  cluster.signal('learner_1', signal.SIGKILL)
  # Gone peer: the chief ends on its own (the coordination heartbeat).
  code = cluster.wait('learner_0', 90)
  assert code not in (0, None), cluster.tail('learner_0')
  errors = [line for line in cluster.log('learner_0').splitlines()
            if line.startswith('learner: error:')]
  assert len(errors) == 1, cluster.tail('learner_0')
  assert 'learner workers lost one another at train_step' in errors[0]
  saved = max(int(s) for s in re.findall(r'ckpt-(\d+)',
                                         cluster.log('learner_0')))
  # Restarted, the group resumes from the chief's last checkpoint.
  flags = [f for f in flags if not f.startswith('--train_steps')]
  _start_group(cluster, flags + [f'--train_steps={saved + 100}'],
               _workers(), tag='_again')
  for i in range(2):
    assert cluster.wait(f'learner_{i}_again', 400) == 0, cluster.tail(
        f'learner_{i}_again')
  chief, other = (_finished(cluster.log(f'learner_{i}_again'))
                  for i in range(2))
  assert chief[1] == other[1] == saved, (chief, other)  # Started there.
  assert chief[0] == other[0] >= saved + 100
  assert chief[2] == other[2], 'the workers ended with different weights'
  # The chief pushed the final weights; only it pushes.
  published = one_value.published_train_step(
      reverb.Client(f'localhost:{port}'), timeout_s=5)
  assert published == chief[0]
  assert 'pushed initial weights' not in cluster.log('learner_1_again')


@pytest.mark.parametrize('workers, index, tf_config, message', [
    ((), 0, None, 'needs the workers'),
    (2, 0, None, 'is a count'),
    (('a:1', 'b:2'), 2, None, 'not an index of the 2'),
    ((), 0, '{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", '
     '"index": 0}}', 'is not "worker"'),
    ((), 0, '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {}}',
     'jobs'),
    ((), 0, 'not json', 'TF_CONFIG is not a cluster spec'),
    (('a:1', 'b:2'), 0, '{"cluster": {"worker": ["a:1", "c:3"]}, "task": '
     '{"type": "worker", "index": 0}}', 'different clusters'),
])
def test_bad_cluster_specs_are_one_line_each(workers, index, tf_config,
                                            message):
  with pytest.raises(UserError, match=message) as e:
    strategy_lib.worker_cluster(workers, index, tf_config)
  assert '\n' not in str(e.value)


def test_workers_without_the_multi_worker_strategy_are_refused():
  with pytest.raises(UserError, match='needs --strategy=multi_worker'):
    strategy_lib.make_strategy('default', workers=('a:1',))


def test_good_cluster_specs():
  assert strategy_lib.worker_cluster(('a:1', 'b:2'), 1, None) == (
      ('a:1', 'b:2'), 1)
  assert strategy_lib.worker_cluster((), 0, json.dumps({
      'cluster': {'worker': ['a:1', 'b:2']},
      'task': {'type': 'worker', 'index': 1}})) == (('a:1', 'b:2'), 1)


@pytest.mark.parametrize('args, message', [
    (['--strategy=multi_worker', '--learner_workers=localhost:1,localhost:1'],
     'names a server twice'),
])
def test_the_learner_refuses_a_bad_cluster_in_one_line(tmp_path, args,
                                                       message):
  out = subprocess.run(
      [sys.executable, '-m', 'learner', '--env=Pendulum-v1',
       f'--root_dir={tmp_path}'] + args,
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env={k: v for k, v in os.environ.items() if k != 'TF_CONFIG'})
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]


def test_a_worker_whose_peer_never_starts_gives_up_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'learner', '--env=Pendulum-v1',
       f'--root_dir={tmp_path}', '--strategy=multi_worker',
       f'--learner_workers={_workers()}', '--learner_index=0',
       '--server_timeout_s=5'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
  assert out.returncode != 0, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1 and 'joined within 5s' in errors[0], (
      out.stderr[-2000:])
