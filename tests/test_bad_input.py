"""Bad input: one line, non-zero exit, within seconds, tables untouched."""

import time

import pytest
import reverb

from common import table_names
from launcher.local_cluster import TINY, free_port

# A live server every case runs against (Pendulum, tiny networks).
SERVER_FLAGS = ['--env=Pendulum-v1', '--rate_limiter=min_size',
                '--min_size_to_sample=10', '--actor_fc_layers=32,32',
                '--critic_joint_fc_layers=32,32']


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  from tests.cluster import Cluster  # pylint: disable=g-import-not-at-top
  cluster = Cluster(str(tmp_path_factory.mktemp('server')))
  port = free_port()
  cluster.start('replay_server', 'replay_server',
                SERVER_FLAGS + [f'--port={port}', '--actor_lease_grace_s=0'])
  # Settled: the actor index queue is filled once, after the lease grace.
  cluster.wait_for_log('replay_server', r'actor indices: \d+ free', 120)
  yield f'localhost:{port}', port
  cluster.stop_all()


def _sizes(address):
  info = reverb.Client(address).server_info(timeout=10)
  # Bookkeeping tables are not data: a client reads the run contract (a
  # sample), and the server consumes actors' lease renewals on its own.
  return {name: (t.current_size, t.num_episodes, t.num_unique_samples)
          for name, t in info.items()
          if name not in (table_names.ACTOR_LEASE_TABLE,
                          table_names.CONTRACT_TABLE)}


def _cases(address, port, tmp):
  ok = SERVER_FLAGS + TINY + [f'--replay_address={address}',
                              f'--root_dir={tmp}', '--server_timeout_s=3']
  return {
      'unknown environment': (
          'actor', ok + ['--env=MinitaurBulletEnv-v9'],
          "unknown environment --env='MinitaurBulletEnv-v9'"),
      'unreachable address': (
          'learner', ok + [f'--replay_address=localhost:{free_port()}'],
          'did not answer within 3s'),
      'replay shard named twice': (
          'learner', ok + [f'--replay_address={address},{address}'],
          'names a server twice'),
      'replay shard unreachable': (
          'actor', ok + [f'--replay_address={address},localhost:{free_port()}',
                         '--task=1'],
          'did not answer within 3s'),
      'malformed address': (
          'actor', ok + ['--replay_address=localhost'], 'is not host:port'),
      'port already in use': (
          'replay_server', SERVER_FLAGS + [f'--port={port}'],
          f'port {port} is already in use'),
      'zero capacity': (
          'replay_server', SERVER_FLAGS + ['--replay_capacity=0',
                                           f'--port={free_port()}'],
          'flag --replay_capacity=0'),
      'negative batch size': (
          'learner', ok + ['--batch_size=-1'], 'flag --batch_size=-1'),
      'capacity below min sample size': (
          'replay_server', SERVER_FLAGS + ['--replay_capacity=100',
                                           '--min_size_to_sample=200',
                                           f'--port={free_port()}'],
          '--min_size_to_sample=200 is larger than --replay_capacity=100'),
      'samples_per_insert without enough min_size_to_sample': (
          'replay_server', ['--env=Pendulum-v1', '--rate_limiter=ratio',
                            '--samples_per_insert=256',
                            '--min_size_to_sample=10',
                            f'--port={free_port()}'],
          '--samples_per_insert needs --min_size_to_sample (10) >= '
          '--batch_size (256)'),
      'unknown strategy': (
          'learner', ok + ['--strategy=gpu'], 'flag --strategy=gpu'),
      'unwritable root_dir': (
          'learner', ok + ['--root_dir=/proc/no_such_dir'],
          '--root_dir=/proc/no_such_dir is not writable'),
      'actor for another environment': (
          'actor', ok + ['--env=MinitaurBulletEnv-v0'],
          '--env=MinitaurBulletEnv-v0 here, but the replay server at'),
      'learner with other network sizes': (
          'learner', ok + ['--actor_fc_layers=64,64'],
          "table 'variables' at"),
      'evaluator for another environment': (
          'actor', ok + ['--mode=eval', '--env=MountainCarContinuous-v0'],
          "table 'variables' at"),
  }


CASES = list(_cases('localhost:1', 1, '/tmp'))


@pytest.mark.parametrize('case', CASES)
def test_bad_input_fails_fast_with_one_line(case, server, cluster, tmp_path):
  address, port = server
  binary, args, expected = _cases(address, port, tmp_path)[case]
  before = _sizes(address)
  start = time.monotonic()
  cluster.start('proc', binary, args)
  code = cluster.wait('proc', 60)
  elapsed = time.monotonic() - start
  log = cluster.log('proc')
  errors = [l for l in log.splitlines() if l.startswith(f'{binary}: error:')]
  assert code != 0, log
  assert len(errors) == 1, log
  assert expected in errors[0], errors[0]
  assert 'Traceback' not in log, log
  assert elapsed < 30, elapsed
  assert _sizes(address) == before
