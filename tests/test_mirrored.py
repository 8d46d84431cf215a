"""The learner under MirroredStrategy over two logical CPU devices."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from launcher.local_cluster import REPO_ROOT, TINY, free_port


def test_learner_trains_under_mirrored_strategy(cluster, tmp_path):
  port = free_port()
  flags = ['--env=Pendulum-v1', f'--replay_address=localhost:{port}',
           '--replay_capacity=5000', '--min_size_to_sample=100',
           '--initial_collect_steps=100', '--train_steps=200',
           '--push_interval_steps=50', '--policy_save_interval=100000'] + TINY
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('actor', 'actor', flags + [f'--root_dir={tmp_path}/a'])
  cluster.start('learner', 'learner', flags + [
      '--strategy=mirrored', '--logical_cpu_devices=2',
      f'--root_dir={tmp_path}/l'])
  assert cluster.wait('learner', 300) == 0, cluster.tail('learner')
  log = cluster.log('learner')
  devices = re.search(r'MirroredStrategy over \[(.*)\]', log).group(1)
  assert 'CPU:0' in devices and 'CPU:1' in devices, devices
  assert 'batch 32 over 2 replica(s)' in log
  m = re.search(r'finished at train_step (\d+) \(started at 0\); loss (\S+);',
                log)
  assert m, cluster.tail('learner')
  assert int(m.group(1)) >= 200
  assert math.isfinite(float(m.group(2)))
  assert cluster.wait('actor', 60) == 0, cluster.tail('actor')


@pytest.mark.parametrize('agent, keys', [
    ('sac', ('critic_loss', 'actor_loss')),
    ('dqn', ('loss',)),
])
def test_mirrored_losses_equal_default_losses(agent, keys):
  """Same weights, same batches: 2 mirrored replicas give one device's losses.

  See tests/mirrored_losses.py (SAC's sampling noise is taken out of its
  critic and actor losses there). A wrong loss scale over replicas (a mean
  per replica summed, a gradient not all-reduced) shows up from the second
  step on.
  """
  out = subprocess.run(
      [sys.executable, '-m', 'tests.mirrored_losses', '--agent', agent],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['default_replicas'] == 1
  assert result['mirrored_replicas'] == 2
  default, mirrored = result['default'], result['mirrored']
  assert len(default) == len(mirrored) == 5
  for key in keys:
    a = np.array([row[key] for row in default])
    b = np.array([row[key] for row in mirrored])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=key)
    assert np.ptp(a) > 1e-3, f'{key} never changed: {a}'  # It trained.
