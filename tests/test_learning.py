"""SAC learns Pendulum-v1 in the distributed system (separate OS processes)."""

import json
import os

import pytest

from tests.cluster import free_port

pytestmark = pytest.mark.slow


def test_pendulum_reaches_minus_400(cluster, tmp_path):
  port = free_port()
  train_steps = 5000
  # Tutorial hyperparameters (batch 256, (256, 256) networks, one train step
  # per env step), 1000 random steps first.
  flags = ['--env=Pendulum-v1', f'--replay_address=localhost:{port}',
           '--min_size_to_sample=1000', '--initial_collect_steps=1000',
           f'--train_steps={train_steps}', '--eval_interval=2500',
           '--num_eval_episodes=10', '--policy_save_interval=100000',
           '--server_timeout_s=120']
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('learner', 'learner', flags + [f'--root_dir={tmp_path}'])
  cluster.start('actor', 'actor', flags + [f'--root_dir={tmp_path}'])
  cluster.start('evaluator', 'actor', flags + ['--mode=eval',
                                               f'--root_dir={tmp_path}'])
  assert cluster.wait('learner', 900) == 0, cluster.tail('learner')
  assert cluster.wait('evaluator', 120) == 0, cluster.tail('evaluator')
  assert cluster.wait('actor', 60) == 0, cluster.tail('actor')

  with open(os.path.join(tmp_path, 'eval', 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  steps = [r['train_step'] for r in rows]
  assert steps == sorted(steps) and steps[-1] >= train_steps, rows
  # Random policy: about -1200.
  assert rows[0]['AverageReturn'] < -700, rows
  assert rows[-1]['AverageReturn'] >= -400, rows
