"""The learner runs with jemalloc where the machine has it (its input pipeline
spends half its CPU in malloc otherwise), and SAC_MALLOC=system opts out."""

import os

import pytest

from common import process
from tests.cluster import Cluster, free_port

pytestmark = pytest.mark.skipif(
    process.jemalloc_path() is None,
    reason='no jemalloc on this machine (apt-get install libjemalloc2)')


def _loaded_libraries(pid):
  with open(f'/proc/{pid}/maps') as f:
    return f.read()


@pytest.mark.parametrize('malloc', ['auto', 'system'])
def test_learner_preloads_jemalloc_unless_told_not_to(tmp_path, malloc):
  cluster = Cluster(str(tmp_path))
  if malloc == 'system':
    os.environ['SAC_MALLOC'] = 'system'
  try:
    # No server: the learner waits for one, with TensorFlow loaded.
    proc = cluster.start('learner', 'learner', [
        '--env=Pendulum-v1', f'--root_dir={tmp_path}/root',
        f'--replay_address=localhost:{free_port()}',
        '--server_timeout_s=120'])
    cluster.wait_for_log('learner', 'waiting for Reverb server', 120)
    maps = _loaded_libraries(proc.pid)  # The pid Popen returned: re-exec
    assert 'libtensorflow' in maps      # keeps it.
    if malloc == 'system':
      assert 'libjemalloc' not in maps
    else:
      assert process.jemalloc_path() in maps
  finally:
    os.environ.pop('SAC_MALLOC', None)
    cluster.stop_all()
