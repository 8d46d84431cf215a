"""SAC learns Pendulum-v1 in the distributed system (separate OS processes)."""

import json
import os

import pytest

from launcher.local_cluster import free_port

pytestmark = pytest.mark.slow


def _rows(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def test_pendulum_reaches_minus_400(cluster, tmp_path):
  """The final evaluation's 10-episode average return is >= -400.

  Tutorial hyperparameters (batch 256, (256, 256) networks, one train step
  per env step, 1000 random steps first), seeded. Judged on the final
  evaluation alone, beside the untrained policy measured in the same run
  (random play scores about -1200).
  """
  port = free_port()
  steps = 5000
  flags = ['--env=Pendulum-v1', f'--replay_address=localhost:{port}',
           '--min_size_to_sample=1000', '--initial_collect_steps=1000',
           f'--train_steps={steps}', f'--eval_interval={steps}', '--seed=1',
           '--num_eval_episodes=10', '--video_episodes=0',
           '--policy_save_interval=100000', '--server_timeout_s=120']
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('learner', 'learner', flags + [f'--root_dir={tmp_path}'])
  cluster.start('actor', 'actor', flags + [f'--root_dir={tmp_path}'])
  cluster.start('evaluator', 'actor', flags + ['--mode=eval',
                                               f'--root_dir={tmp_path}'])
  for name in ('learner', 'actor', 'evaluator'):
    assert cluster.wait(name, 600) == 0, cluster.tail(name)
  rows = _rows(os.path.join(tmp_path, 'eval', 'metrics.jsonl'))
  assert [r['train_step'] for r in rows] == [0, steps], rows
  untrained, final = rows[0]['AverageReturn'], rows[-1]['AverageReturn']
  assert untrained < -700, rows
  assert final >= -400, (
      f'final return {final:.0f} < -400 (untrained {untrained:.0f})')
