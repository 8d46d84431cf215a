"""common.process.StopRequest's deadline: a process stuck in a call that
cannot be interrupted exits(1) `deadline_s` after SIGTERM; one whose main
thread runs Python all the while (tracing a tf.function on a loaded machine)
is given time to finish, up to BUSY_FACTOR times the deadline."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from common import process

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The main thread signals itself ready, then does `work` without asking the
# stop request; it exits 0 if it gets to the end.
_SCRIPT = textwrap.dedent('''
    import sys, threading, time
    from absl import logging
    from common import process
    logging.set_verbosity(logging.INFO)
    stop = process.StopRequest(deadline_s={deadline}).install()
    print('ready', flush=True)
    {work}
    print('done', stop(), flush=True)
''')

_WORK = {
    # Blocked in C (a lock), as a sample from a server that is gone.
    'stuck': 'threading.Event().wait()',
    # Python all along (as autograph tracing), for `seconds`.
    'busy': ('end = time.monotonic() + {seconds}\n'
             'while time.monotonic() < end:\n'
             '  sum(i * i for i in range(1000))'),
}


def _run(work: str, deadline: float, seconds: float = 0.0):
  script = _SCRIPT.format(deadline=deadline,
                          work=_WORK[work].format(seconds=seconds))
  proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'ready'
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  return proc.returncode, time.monotonic() - start, out, err


def test_stuck_main_thread_exits_1_at_the_deadline():
  rc, took, out, err = _run('stuck', deadline=2)
  assert rc == 1, err
  assert 'done' not in out
  assert 'still running 2s after SIGTERM (waiting inside a call' in err
  assert 1.5 < took < 15, took


def test_busy_main_thread_is_not_stuck_and_finishes():
  # Busy for twice the deadline: a deadline counted from the signal would
  # have killed it.
  rc, took, out, err = _run('busy', deadline=2, seconds=4)
  assert rc == 0, err
  assert 'done True' in out
  assert 'exiting now' not in err
  assert took >= 3.5, took


def test_busy_for_good_exits_1_at_busy_factor_times_the_deadline():
  deadline = 1
  rc, took, out, err = _run('busy', deadline=deadline, seconds=600)
  assert rc == 1, err
  assert 'done' not in out
  assert 'still busy' in err and 'after SIGTERM; exiting now' in err
  assert 0.9 * process.StopRequest.BUSY_FACTOR * deadline < took < 30, took
