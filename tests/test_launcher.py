"""The one-command local cluster: outputs, actor restarts, Ctrl-C."""

import glob
import json
import os
import re
import signal
import time

from absl import flags
import imageio
import pytest
import tensorflow as tf

from common import config as config_lib
from common import config_flags
from launcher import __main__ as launcher_main
from launcher.local_cluster import TINY
from launcher.local_cluster import processes_naming

PENDULUM = ['--env=Pendulum-v1', '--replay_capacity=5000',
            '--min_size_to_sample=200', '--initial_collect_steps=200',
            '--num_actors=2', '--push_interval_steps=20',
            '--pull_interval_steps=20', '--policy_save_interval=100000',
            '--progress_interval_s=2'] + TINY


def _children_of(root_dir: str, launcher_pid: int):
  """{pid: argv} of the launcher's children: processes naming root_dir."""
  return processes_naming(root_dir, exclude=(launcher_pid,))


def _tags(event_dir: str):
  tags = set()
  for path in glob.glob(os.path.join(event_dir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add(value.tag)
  return tags


def test_launcher_end_to_end_with_an_actor_killed(cluster, tmp_path):
  root = str(tmp_path / 'run')
  train_steps = 1500
  launcher = cluster.start('launcher', 'launcher', PENDULUM + [
      f'--root_dir={root}', f'--train_steps={train_steps}',
      '--eval_interval=500', '--num_eval_episodes=2',
      '--final_eval_episodes=3', '--video_episodes=1'])
  # Kill actor 1 mid-run; the launcher must restart it.
  cluster.wait_for_log('launcher', r'\[learner\].*learner: train_step \d+',
                       240)
  victims = [p for p, argv in _children_of(root, launcher.pid).items()
             if '--task=1 --mode=collect' in ' '.join(argv)]
  assert len(victims) == 1, victims
  os.kill(victims[0], signal.SIGKILL)
  cluster.wait_for_log('launcher', r'actor_1 died with exit code -9; '
                       r'restarting it', 30)
  assert cluster.wait('launcher', 400) == 0, cluster.tail('launcher', 80)
  log = cluster.log('launcher')
  # The restarted actor came back (it logged again after the restart).
  after = log.split('actor_1 died with exit code -9')[1]
  assert re.search(r'\[actor_1\].*actor 1: ', after), after[-3000:]
  # One progress line format a user watches.
  assert re.search(r'\[launcher\] train_step \d+/1500 \([\d.]+%\) \| [\d.]+ '
                   r'train steps/s \| [\d.]+ env steps/s \(\d actors\) \| '
                   r'AverageReturn .* \| ETA', log)
  assert not _children_of(root, launcher.pid)

  eval_dir = os.path.join(root, 'eval')
  with open(os.path.join(eval_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  steps = [r['train_step'] for r in rows]
  assert len(rows) >= 2 and steps == sorted(set(steps)), rows
  assert steps[-1] >= train_steps
  assert all(isinstance(r['AverageReturn'], float) for r in rows)
  # Cheap evaluations during the run, the exact one at the end.
  assert [r['num_episodes'] for r in rows] == [2] * (len(rows) - 1) + [3]

  png = os.path.join(eval_dir, 'returns.png')
  image = imageio.v2.imread(png)
  assert image.shape[0] >= 200 and image.shape[1] >= 300
  assert os.path.getsize(png) > 5000
  assert image.std() > 0  # Not a blank canvas.

  videos = glob.glob(os.path.join(eval_dir, '*.mp4'))
  assert len(videos) == 1, videos
  frames = imageio.v2.mimread(videos[0], memtest=False)
  # Pendulum episodes are 200 steps: the reset frame plus one per step,
  # played at the control rate (dt 0.05 s: 20 fps), so 10 s in 10 s.
  assert len(frames) >= 201
  assert imageio.v2.get_reader(videos[0]).get_meta_data()['fps'] == 20
  # Every process (server, learner, actors, evaluator) imported gym, none
  # printed its "unmaintained" notice.
  assert 'unmaintained' not in log

  assert {'Losses/critic_loss', 'Losses/actor_loss',
          'Losses/alpha_loss'} <= _tags(os.path.join(root, 'train'))
  for task in range(2):
    tags = _tags(os.path.join(root, f'actor_{task}'))
    assert {'Actor/env_steps_per_second', 'Actor/weight_version_lag',
            'Metrics/AverageReturn'} <= tags, tags
  assert {'Metrics/AverageReturn', 'Metrics/AverageEpisodeLength'} <= _tags(
      eval_dir)


def test_ctrl_c_stops_every_child(cluster, tmp_path):
  root = str(tmp_path / 'run')
  launcher = cluster.start('launcher', 'launcher', PENDULUM + [
      f'--root_dir={root}', '--train_steps=100000'])
  cluster.wait_for_log('launcher', r'\[learner\].*learner: train_step \d+',
                       240)
  assert len(_children_of(root, launcher.pid)) == 5  # server, learner, 2 actors, evaluator
  start = time.monotonic()
  cluster.signal('launcher', signal.SIGINT)
  # Each group has its own grace (learner 60 s, actors and evaluator 35 s);
  # on a loaded CI machine the groups took 15-30 s in all.
  code = cluster.wait('launcher', 120)
  assert time.monotonic() - start < 120
  assert code == 0, cluster.tail('launcher', 60)
  assert not _children_of(root, launcher.pid), 'orphans left behind'
  log = cluster.log('launcher')
  assert 'SIGINT received; stopping children' in log
  # The learner's last step is in its final checkpoint and was pushed: the
  # server's own checkpoint on stop holds the weights of that step.
  last = int(re.search(r'learner: finished at train_step (\d+)', log).group(1))
  checkpoints = glob.glob(os.path.join(root, 'train', 'checkpoints',
                                       'ckpt-*.index'))
  assert max(int(re.search(r'ckpt-(\d+)', p).group(1))
             for p in checkpoints) == last
  assert re.search(r'checkpoint \(on stop\) written .*; weights of '
                   rf'train_step {last}\n', log), log[-3000:]


def test_launcher_killed_takes_its_children_down(cluster, tmp_path):
  """SIGKILL of the launcher: the kernel sends its children SIGTERM."""
  root = str(tmp_path / 'run')
  launcher = cluster.start('launcher', 'launcher', PENDULUM + [
      f'--root_dir={root}', '--train_steps=100000', '--with_evaluator=false'])
  cluster.wait_for_log('launcher', r'\[learner\].*learner: train_step \d+',
                       240)
  children = _children_of(root, launcher.pid)
  assert len(children) == 4, children  # server, learner, 2 actors
  cluster.signal('launcher', signal.SIGKILL)
  cluster.wait('launcher', 10)
  deadline = time.monotonic() + 40
  while time.monotonic() < deadline and processes_naming(root):
    time.sleep(0.5)
  assert not processes_naming(root), 'children outlived the launcher'


def test_learner_failure_stops_the_cluster_with_exit_1(cluster, tmp_path):
  """A dead learner is reported, never restarted; every child stops."""
  root = str(tmp_path / 'run')
  launcher = cluster.start('launcher', 'launcher', PENDULUM + [
      f'--root_dir={root}', '--train_steps=100000', '--with_evaluator=false'])
  cluster.wait_for_log('launcher', r'\[learner\].*learner: train_step \d+',
                       240)
  learner = [pid for pid, argv in _children_of(root, launcher.pid).items()
             if 'learner' in argv]
  assert len(learner) == 1
  os.kill(learner[0], signal.SIGKILL)
  assert cluster.wait('launcher', 60) == 1, cluster.tail('launcher', 60)
  log = cluster.log('launcher')
  assert 'learner died with exit code -9; stopping the cluster' in log
  assert log.count('[learner]') and 'restarting it' not in log.split(
      'learner died with exit code -9')[1]
  assert not _children_of(root, launcher.pid), 'orphans left behind'


def test_launcher_runs_two_replay_shards(cluster, tmp_path):
  """--replay_shards=2: two servers; each actor fills one; all are counted."""
  root = str(tmp_path / 'run')
  cluster.start('launcher', 'launcher', PENDULUM + [
      f'--root_dir={root}', '--train_steps=300', '--replay_shards=2',
      '--eval_interval=300', '--num_eval_episodes=1', '--video_episodes=0'])
  assert cluster.wait('launcher', 400) == 0, cluster.tail('launcher', 80)
  log = cluster.log('launcher')
  assert re.search(r'started replay_server, replay_server_1, learner', log)
  assert 'learner: samples from 2 replay shards' in log
  assert re.search(r'\[actor_1\].*writes to replay shard 1 of 2', log)
  # Each shard persists on its own.
  for name in ('replay_checkpoints', 'replay_checkpoints_1'):
    assert os.listdir(os.path.join(root, name)), name
  with open(os.path.join(root, 'eval', 'metrics.jsonl')) as f:
    final = [json.loads(line) for line in f][-1]
  # The evaluator counts the transitions of both shards (one shard holds
  # about half): nearly every env step the actors logged.
  env_steps = sum(int(m) for m in re.findall(
      r'actor \d: training finished; (\d+) env steps', log))
  assert final['agent_steps'] >= 0.75 * env_steps, (final, env_steps)


def _server_flags(argv):
  """{shard: {flag: its last value}} of the servers children() starts."""
  flags.FLAGS(['launcher'] + argv)
  try:
    ports = [8000, 8001][:flags.FLAGS.replay_shards]
    kids = launcher_main.children(
        config_flags.build(config_lib.LauncherConfig), argv, ports, '/runs/r')
  finally:
    flags.FLAGS.unparse_flags()
  servers = [kid for kid in kids if kid.module == 'replay_server']
  return {shard: dict(a[2:].split('=', 1) for a in kid.args if '=' in a)
          for shard, kid in enumerate(servers)}


def test_replay_shards_never_share_or_nest_checkpoint_directories():
  """Reverb keeps the entry of its directory that sorts last: a shard_1/
  inside shard 0's directory would delete every checkpoint shard 0 wrote."""
  two = _server_flags(['--checkpoint_dir=/ckpt', '--replay_shards=2'])
  assert [two[k]['checkpoint_dir'] for k in (0, 1)] == ['/ckpt/shard_0',
                                                        '/ckpt/shard_1']
  assert [(two[k]['port'], two[k].get('replay_shard')) for k in (0, 1)] == [
      ('8000', '0'), ('8001', '1')]
  one = _server_flags(['--checkpoint_dir=/ckpt'])
  assert one[0]['checkpoint_dir'] == '/ckpt'
  default = _server_flags(['--replay_shards=2'])
  assert [default[k]['checkpoint_dir'] for k in (0, 1)] == [
      '/runs/r/replay_checkpoints', '/runs/r/replay_checkpoints_1']
  for servers in (two, default):
    a, b = (servers[k]['checkpoint_dir'] for k in (0, 1))
    assert os.path.commonpath([a, b]) not in (a, b)  # Siblings.


def test_no_actor_left_stops_the_cluster_with_one_line(cluster, tmp_path):
  """The only actor dies past its restarts: the run stops, never starves."""
  root = str(tmp_path / 'run')
  launcher = cluster.start('launcher', 'launcher', PENDULUM + [
      f'--root_dir={root}', '--train_steps=100000', '--num_actors=1',
      '--with_evaluator=false', '--max_actor_restarts=0'])
  # As soon as it runs: what the learner does meanwhile does not matter.
  cluster.wait_for_log('launcher', r'\[launcher\] started', 60)
  actor = [p for p, argv in _children_of(root, launcher.pid).items()
           if '--mode=collect' in argv]
  assert len(actor) == 1
  os.kill(actor[0], signal.SIGKILL)
  cluster.wait_for_log('launcher', 'no actor is left to collect', 30)
  assert cluster.wait('launcher', 90) == 1, cluster.tail('launcher', 60)
  log = cluster.log('launcher')
  assert ('[launcher] error: no actor is left to collect while the learner '
          'trains (actor_0 died with exit code -9, not restarted: 1 '
          'consecutive failure, --max_actor_restarts=0); stopping the '
          'cluster') in log, log[-3000:]
  assert 'restarting actor_0' not in log
  assert not _children_of(root, launcher.pid), 'orphans left behind'


def test_learner_workers_become_one_group_of_learner_children():
  """--learner_workers=2: the launcher starts two learner processes, one
  group (the supervisor restarts it whole: tests/test_supervisor.py; the
  workers training together: tests/test_multi_worker.py)."""
  from common import config as config_lib  # pylint: disable=g-import-not-at-top
  from common.errors import UserError  # pylint: disable=g-import-not-at-top
  from launcher import __main__ as launcher_main  # pylint: disable=g-import-not-at-top
  kids = launcher_main.learners(
      config_lib.LauncherConfig(learner_workers=2), ['--env=Pendulum-v1'])
  assert [k.role for k in kids] == ['learner', 'learner_1']
  assert {k.kind for k in kids} == {'learner'}
  assert {k.group for k in kids} == {'learner'}
  workers = [[a for a in k.args if a.startswith('--learner_workers=')][-1]
             for k in kids]
  assert workers[0] == workers[1] and workers[0].count('localhost:') == 2
  assert [[a for a in k.args if a.startswith('--learner_index=')][-1]
          for k in kids] == ['--learner_index=0', '--learner_index=1']
  assert all('--strategy=multi_worker' in k.args for k in kids)
  one = launcher_main.learners(config_lib.LauncherConfig(), [])
  assert [k.role for k in one] == ['learner'] and not one[0].group
  with pytest.raises(UserError, match='takes a count'):
    launcher_main.learners(config_lib.LauncherConfig(
        learner_workers=('a:1', 'b:2')), [])
