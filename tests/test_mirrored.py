"""The learner under MirroredStrategy over two logical CPU devices."""

import math
import re

from tests.cluster import TINY, free_port


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
