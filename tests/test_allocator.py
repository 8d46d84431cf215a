"""The learner runs with jemalloc where the machine has it (its input pipeline
spends half its CPU in malloc otherwise), and SAC_MALLOC=system opts out."""

import os
import subprocess
import sys

import pytest

from common import process
from launcher.local_cluster import REPO_ROOT, free_port
from tests.cluster import Cluster

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


def test_unknown_sac_malloc_is_one_line_and_exit_2():
  out = subprocess.run(
      [sys.executable, '-m', 'learner', '--env=Pendulum-v1'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
      env=dict(os.environ, SAC_MALLOC='sytem'))
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: SAC_MALLOC='sytem': use SAC_MALLOC=system (glibc's malloc) or "
      'leave it unset (jemalloc where installed)']
