"""The replay server's checkpoints: a directory it owns, restores that match
the flags, and a disk that is really full."""

import os
import re
import subprocess
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf

from common import config as config_lib
from common import table_names
from common.errors import UserError
from tests.cluster import Cluster
from launcher.local_cluster import free_port
from replay_server import checkpoints as checkpoints_lib
from replay_server import server as server_lib
from replay_server import tables
from variable_container import one_value

# Small networks: the tables' settings, not their size, are under test.
SERVER = ['--env=Pendulum-v1', '--actor_fc_layers=8',
          '--critic_joint_fc_layers=8', '--rate_limiter=min_size',
          '--min_size_to_sample=10', '--actor_lease_grace_s=0']
WRITTEN = r'checkpoint \((?:on stop|periodic)\) written to (\S+):'


def _start(cluster, name, checkpoint_dir, *extra):
  port = free_port()
  cluster.start(name, 'replay_server', SERVER + [
      f'--port={port}', f'--replay_address=localhost:{port}',
      f'--checkpoint_dir={checkpoint_dir}'] + list(extra))
  return f'localhost:{port}'


def _refused(cluster, name, timeout=120):
  """The one error line of a server that must exit at start."""
  assert cluster.wait(name, timeout) == 2, cluster.tail(name)
  lines = cluster.log(name).strip().splitlines()
  assert lines[-1].startswith('replay_server: error: '), cluster.tail(name)
  assert 'Traceback' not in cluster.log(name)
  return lines[-1]


def _stop_and_checkpoint(cluster, name):
  """SIGTERM; the on-stop checkpoint's path, checked to be complete."""
  cluster.signal(name)
  assert cluster.wait(name, 60) == 0, cluster.tail(name)
  path = re.findall(r'checkpoint \(on stop\) written to (\S+):',
                    cluster.log(name))[-1]
  assert os.path.isfile(os.path.join(path, 'DONE')), (path, cluster.tail(name))
  return path


def _wait_for(condition, timeout, what):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f'not within {timeout}s: {what}'
    time.sleep(0.3)


# --- Point 1: the server owns its checkpoint directory.


@pytest.mark.parametrize('entry', ['shard_1/', 'notes.txt', 'zz_notes.txt',
                                   '2999-01-01T00:00:00.5+00:00/'])
def test_a_directory_not_only_its_own_is_refused_at_start(cluster, tmp_path,
                                                          entry):
  """A foreign entry (or a future-dated checkpoint) would make Reverb delete
  each new checkpoint as soon as it is written: one line, exit 2."""
  checkpoints = tmp_path / 'checkpoints'
  checkpoints.mkdir()
  name = entry.rstrip('/')
  if entry.endswith('/'):
    (checkpoints / name).mkdir()
    (checkpoints / name / 'DONE').write_text('')
  else:
    (checkpoints / name).write_text('mine')
  _start(cluster, 'server', checkpoints)
  line = _refused(cluster, 'server')
  assert repr(name) in line, line
  assert ('move it away' in line and
          ('use an empty directory' in line or 'rename it' in line)), line
  assert sorted(os.listdir(checkpoints)) == [name]  # Nothing deleted.


def test_a_checkpoint_that_reverb_deleted_is_reported_missing(cluster,
                                                              tmp_path):
  """Reverb's clean-up deletes its own new checkpoint when an entry sorts
  after it; the server says so (never "written"), and writes again once the
  directory is its own."""
  checkpoints = tmp_path / 'checkpoints'
  _start(cluster, 'server', checkpoints, '--checkpoint_interval_s=1')
  first = cluster.wait_for_log('server', WRITTEN, 120).group(1)
  assert os.path.isfile(os.path.join(first, 'DONE'))
  # Dropped in while the server runs, after the check at start.
  (checkpoints / 'zz_notes.txt').write_text('mine')
  cluster.wait_for_log('server', r'checkpoint \(periodic\) missing: Reverb '
                       r'wrote \S+, but it is not there', 60)
  (checkpoints / 'zz_notes.txt').unlink()
  path = _stop_and_checkpoint(cluster, 'server')
  assert os.listdir(checkpoints) == [os.path.basename(path)]


# --- Point 2: a restore never silently replaces the table's settings.


@pytest.fixture
def uniform_checkpoint(tmp_path):
  """A replay server's checkpoint of a uniform table of 5000, and a train_step."""
  cluster = Cluster(str(tmp_path))
  checkpoints = tmp_path / 'checkpoints'
  address = _start(cluster, 'first', checkpoints, '--replay_capacity=5000')
  try:
    cluster.wait_for_log('first', 'serving tables', 120)
    one_value.insert_int64(reverb.Client(address),
                           table_names.TRAIN_STEP_TABLE, 77)
    _stop_and_checkpoint(cluster, 'first')
  finally:
    cluster.stop_all()
  return checkpoints


def test_restart_with_other_replay_flags_is_refused(cluster,
                                                    uniform_checkpoint):
  """The issue's reproduction: without the check it served the uniform table
  of 5000 under --replay=prioritized --replay_capacity=20000."""
  before = sorted(os.listdir(uniform_checkpoint))
  _start(cluster, 'prioritized', uniform_checkpoint, '--replay=prioritized',
         '--replay_capacity=20000')
  line = _refused(cluster, 'prioritized')
  assert line.endswith(
      f'--replay: the checkpoint in {uniform_checkpoint} was written with '
      '--replay=uniform, the flags say --replay=prioritized; restart with the '
      'old flags or use an empty --checkpoint_dir'), line
  _start(cluster, 'gamma', uniform_checkpoint, '--replay_capacity=5000',
         '--gamma=0.9')
  assert '--gamma: the checkpoint in' in _refused(cluster, 'gamma')
  _start(cluster, 'capacity', uniform_checkpoint, '--replay_capacity=20000')
  line = _refused(cluster, 'capacity')
  assert ("has table 'uniform_table' with max_size 5000, but the flags ask "
          'for 20000 (--replay_capacity): restart with the flags it was '
          'written with, or use an empty or new --checkpoint_dir') in line
  assert sorted(os.listdir(uniform_checkpoint)) == before  # Untouched.
  # The same flags restore the checkpoint.
  address = _start(cluster, 'same', uniform_checkpoint,
                   '--replay_capacity=5000')
  cluster.wait_for_log('same', 'restored: ', 120)
  client = reverb.Client(address)
  assert one_value.published_train_step(client) == 77
  info = client.server_info(timeout=10)[table_names.REPLAY_TABLE]
  assert info.max_size == 5000


def _replay(**changes):
  settings = dict(replay_capacity=100, min_size_to_sample=1,
                  samples_per_insert=None, prioritized=True)
  settings.update(changes)
  return config_lib.ReplayConfig(**settings)


@pytest.mark.parametrize('changed, message', [
    (dict(replay=_replay(replay_capacity=200)),
     "with max_size 100, but the flags ask for 200 (--replay_capacity)"),
    (dict(replay=_replay(priority_exponent=0.9)),
     'with selector (sampler) prioritized (priority_exponent=0.6), but the '
     'flags ask for prioritized (priority_exponent=0.9)'),
    (dict(replay=_replay(prioritized=False)),
     'with selector (sampler) prioritized (priority_exponent=0.6), but the '
     'flags ask for uniform'),
    (dict(replay=_replay(samples_per_insert=4.0, min_size_to_sample=8)),
     'with rate limiter MinSize(1), but the flags ask for SampleToInsertRatio('
     'samples_per_insert=4, min_size_to_sample=8, error_buffer='),
    (dict(replay=_replay(min_size_to_sample=5)),
     'with rate limiter MinSize(1), but the flags ask for MinSize(5)'),
    (dict(signature=tf.TensorSpec([3], tf.float32)),
     'with signature [data: float32[2]], but the flags ask for '
     '[data: float32[3]]'),
])
def test_a_restored_table_must_have_the_flags_settings(tmp_path, changed,
                                                       message):
  def table(replay=_replay(), signature=tf.TensorSpec([2], tf.float32)):
    return tables.replay_table(signature, replay, batch_size=1)

  checkpoints = str(tmp_path)
  server = server_lib.start_server([table()], free_port(), checkpoints)
  try:
    client = reverb.Client(f'localhost:{server.port}')
    client.insert(np.zeros(2, np.float32),
                  priorities={table_names.REPLAY_TABLE: 1.0})
    written = client.checkpoint()
  finally:
    server.stop()
  port = free_port()
  with pytest.raises(UserError) as e:
    server_lib.start_server([table(**changed)], port, checkpoints)
  assert f"the checkpoint in {checkpoints} has table 'uniform_table' " in str(
      e.value)
  assert message in str(e.value), str(e.value)
  assert '\n' not in str(e.value)
  assert server_lib.port_is_free(port)
  assert os.listdir(checkpoints) == [os.path.basename(written)]
  # The flags it was written with restore it.
  server = server_lib.start_server([table()], free_port(), checkpoints)
  try:
    info = reverb.Client(f'localhost:{server.port}').server_info()
    assert info[table_names.REPLAY_TABLE].current_size == 1
  finally:
    server.stop()


# --- Point 10, the server's half: a filesystem that is really full.


@pytest.fixture
def tiny_filesystem(tmp_path):
  mount_point = tmp_path / 'tmpfs'
  mount_point.mkdir()
  mounted = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount_point)],
      capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip('mounting a tmpfs is not permitted here (needs root or '
                f'CAP_SYS_ADMIN): {mounted.stderr.strip()}')
  try:
    yield mount_point
  finally:
    subprocess.run(['umount', '-l', str(mount_point)], check=False)


def _fill(path):
  """Writes `path` until the filesystem has not one byte left."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
  try:
    size = 65536
    while size:
      try:
        os.write(fd, b'\0' * size)
      except OSError:
        size //= 2
  finally:
    os.close(fd)


def test_a_full_disk_fails_a_checkpoint_and_the_server_serves_on(
    cluster, tiny_filesystem):
  """On a full tmpfs no checkpoint is written (logged), the last one is
  kept, clients go on, and once space is back it writes again.

  (Reverb 0.14 alone writes empty files with a DONE marker there, reports
  success and deletes the checkpoint before.)
  """
  checkpoints = tiny_filesystem / 'checkpoints'
  filler = tiny_filesystem / 'filler'
  address = _start(cluster, 'server', checkpoints, '--checkpoint_interval_s=1')
  cluster.wait_for_log('server', 'serving tables', 120)
  client = reverb.Client(address)
  one_value.insert_int64(client, table_names.TRAIN_STEP_TABLE, 5)
  complete = cluster.wait_for_log(
      'server', r'checkpoint \(periodic\) written to (\S+): .*train_step 5',
      60).group(1)
  _fill(filler)
  failed = len(cluster.log('server'))
  cluster.wait_for_log('server', r'checkpoint \(periodic\) (not written|'
                       r'failed)', 60)
  # Still serving: inserts and samples go on.
  one_value.insert_int64(client, table_names.TRAIN_STEP_TABLE, 6)
  assert one_value.published_train_step(client) == 6
  assert cluster.procs['server'].poll() is None
  cluster.wait_for_log('server', r'checkpoint \(periodic\) (not written|'
                       r'failed)[^\n]*\n(.*\n)*.*checkpoint \(periodic\) '
                       r'(not written|failed)', 30)
  # The last complete checkpoint is kept, whole, and it is all there is.
  assert os.listdir(checkpoints) == [os.path.basename(complete)]
  assert checkpoints_lib.checkpoint_damage(complete) is None
  assert 'written to' not in cluster.log('server')[failed:]
  # Space is back: the next checkpoint is written and whole.
  filler.unlink()
  path = cluster.wait_for_log(
      'server', r'checkpoint \(periodic\) written to (\S+): .*train_step 6',
      60).group(1)
  assert checkpoints_lib.checkpoint_damage(path) is None
  path = _stop_and_checkpoint(cluster, 'server')
  assert checkpoints_lib.checkpoint_damage(path) is None


def test_a_damaged_checkpoint_is_never_restored(cluster, tiny_filesystem,
                                                tmp_path):
  """What Reverb alone writes on a full disk (empty files and DONE) is
  refused in one line; a partial one (no DONE) is named and skipped."""
  checkpoints = tiny_filesystem / 'checkpoints'
  queue = reverb.Table.queue('q', 10)
  server = reverb.Server([queue], port=free_port(),
                         checkpointer=reverb.checkpointers.DefaultCheckpointer(
                             str(checkpoints)))
  try:
    client = reverb.Client(f'localhost:{server.port}')
    client.insert(np.arange(100, dtype=np.int64), {'q': 1.0})
    _fill(tiny_filesystem / 'filler')
    damaged = client.checkpoint()  # "Succeeds".
  finally:
    server.stop()
  assert os.path.isfile(os.path.join(damaged, 'DONE'))
  assert checkpoints_lib.checkpoint_damage(damaged) == (
      'chunks.tfrecord is empty')
  (tiny_filesystem / 'filler').unlink()  # Space is back; the damage stays.
  _start(cluster, 'server', checkpoints)
  line = _refused(cluster, 'server')
  assert (f'the checkpoint {os.path.basename(damaged)!r} in --checkpoint_dir='
          f'{checkpoints} is damaged (chunks.tfrecord is empty; '
          'written on a full disk?) and would be restored: move it away') in (
              line), line
  # A partial checkpoint (no DONE), newer than a complete one: named in a
  # warning and skipped; the complete one is restored.
  good = tmp_path / 'good'
  server = server_lib.start_server([reverb.Table.queue('q', 10)],
                                   free_port(), str(good))
  try:
    client = reverb.Client(f'localhost:{server.port}')
    client.insert(np.int64(42), {'q': 1.0})
    client.checkpoint()
  finally:
    server.stop()
  partial = good / checkpoints_lib.checkpoint_name_now()
  partial.mkdir()
  (partial / 'tables.tfrecord').write_bytes(b'')
  server = server_lib.start_server([reverb.Table.queue('q', 10)],
                                   free_port(), str(good))
  try:
    client = reverb.Client(f'localhost:{server.port}')
    assert [int(s[0].data[0]) for s in client.sample('q')] == [42]
  finally:
    server.stop()
