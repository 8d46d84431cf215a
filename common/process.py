"""What every process entry point shares: quiet start-up, one-line errors, stop signals.

Import this module before TensorFlow: it turns TensorFlow's C++ start-up noise
down unless the user asked for it.
"""

import os
import signal
import socket
import sys
import threading
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from common.errors import UserError  # pylint: disable=g-import-not-at-top


# Where Debian/Ubuntu (apt-get install libjemalloc2) and Fedora put jemalloc.
JEMALLOC_PATHS = (
    '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
    '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
    '/usr/lib64/libjemalloc.so.2',
    '/usr/local/lib/libjemalloc.so.2',
)


def jemalloc_path():
  """This machine's jemalloc, or None."""
  return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def prefer_jemalloc():
  """Re-executes this process with jemalloc preloaded, where the machine has it.

  Call before anything else at the top of an entry point. Reverb's sampler
  allocates and frees a buffer per chunk it decompresses; under glibc malloc
  that is half the learner's input-pipeline CPU, and jemalloc cuts the
  pipeline's CPU per batch by about half (BENCHMARKS.md). A no-op when
  jemalloc is missing, when LD_PRELOAD already names an allocator, or with
  SAC_MALLOC=system in the environment; any other SAC_MALLOC value but
  'jemalloc' is an error (exit 2). The process keeps its pid.
  """
  choice = os.environ.get('SAC_MALLOC', '')
  if choice not in ('', 'jemalloc', 'system'):
    sys.stderr.write(f'error: SAC_MALLOC={choice!r}: use SAC_MALLOC=system '
                     '(glibc\'s malloc) or leave it unset (jemalloc where '
                     'installed)\n')
    sys.exit(2)
  if choice == 'system':
    return
  if allocator() != 'system':  # jemalloc, tcmalloc: the user chose; or done.
    return
  path = jemalloc_path()
  if path is None:
    return
  preload = os.environ.get('LD_PRELOAD', '')
  env = dict(os.environ, LD_PRELOAD=f'{path} {preload}'.strip())
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:
    pass  # Go on with the system's malloc.


def allocator() -> str:
  """The malloc this process runs with: 'jemalloc', another preloaded
  allocator's library name (e.g. libtcmalloc.so.4), or 'system'."""
  for library in os.environ.get('LD_PRELOAD', '').replace(':', ' ').split():
    name = os.path.basename(library)
    if 'malloc' in name:
      return 'jemalloc' if 'jemalloc' in name else name
  return 'system'


def _whereabouts(thread_id: int) -> tuple:
  """Where a thread is and how much CPU it has used (in steps of 5 ms):
  equal twice only if it neither ran Python nor used the CPU in between."""
  # sys._current_frames is documented (the sys module's docs).
  frame = sys._current_frames().get(thread_id)  # pylint: disable=protected-access
  here = []
  while frame is not None and len(here) < 8:
    here.append((frame.f_code, frame.f_lasti))
    frame = frame.f_back
  try:
    cpu = time.clock_gettime(time.pthread_getcpuclockid(thread_id))
  except (AttributeError, OSError):
    cpu = 0.0
  return tuple(here), int(cpu / 0.005)


class StopRequest:
  """Set by SIGTERM/SIGINT; loops poll it and finish their current step.

  Set from a thread of its own, not from a Python signal handler: those run
  only when the main thread runs Python, and the main thread may wait inside
  TensorFlow for a long time (the learner's input pipeline waiting for data,
  which asks this request whether to go on).
  """

  POLL_S = 0.5
  BUSY_FACTOR = 4

  def __init__(self, deadline_s: float = 0.0):
    """With `deadline_s`, a process whose main thread stays in one place
    that long after the first signal exits(1): it is stuck inside a call
    that cannot be interrupted (e.g. sampling from a server that is gone).
    A main thread that runs Python all the while (tracing a tf.function on a
    loaded machine, writing the final checkpoint) is not stuck: it gets
    `BUSY_FACTOR` times `deadline_s` in all."""
    self._event = threading.Event()
    self.signal_name = None
    self._deadline_s = deadline_s

  def install(self):
    """Call from the main thread."""
    receive, send = socket.socketpair()
    send.setblocking(False)
    # CPython's C-level handler writes the signal number here at once,
    # whichever thread the kernel interrupted.
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda *_: None)
    self._sockets = (receive, send)

    def watch():
      while True:
        for signum in receive.recv(16):
          if signum in (signal.SIGTERM, signal.SIGINT):
            self._handle(signum, None)

    threading.Thread(target=watch, daemon=True, name='stop-request').start()
    return self

  def _handle(self, signum, _frame):
    if self._event.is_set():
      # A second signal means the user is out of patience.
      logging.warning('second %s: exiting now', signal.Signals(signum).name)
      os._exit(1)  # pylint: disable=protected-access
    self.signal_name = signal.Signals(signum).name
    logging.info('%s received: finishing the current step, then exiting',
                 self.signal_name)
    self._event.set()
    if self._deadline_s:
      threading.Thread(target=self._exit_when_stuck, daemon=True,
                       name='stop-deadline').start()

  def _exit_when_stuck(self):
    """exit(1) once the main thread has not moved for `deadline_s` (or has
    run `BUSY_FACTOR` times that long in all)."""
    main = threading.main_thread().ident
    start = moved = time.monotonic()
    where = None
    while True:
      time.sleep(self.POLL_S)
      here = _whereabouts(main)
      if here != where:
        where, moved = here, time.monotonic()
      if time.monotonic() - moved >= self._deadline_s:
        reason = (f'still running {self._deadline_s:g}s after '
                  f'{self.signal_name} (waiting inside a call that cannot be '
                  'interrupted, e.g. for a replay server that is gone)')
      elif time.monotonic() - start >= self.BUSY_FACTOR * self._deadline_s:
        reason = (f'still busy {time.monotonic() - start:.0f}s after '
                  f'{self.signal_name}')
      else:
        continue
      logging.warning('%s; exiting now', reason)
      logging.flush()
      os._exit(1)  # pylint: disable=protected-access

  def __call__(self) -> bool:
    return self._event.is_set()

  def wait(self, seconds: float) -> bool:
    return self._event.wait(seconds)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
  """In a child process: receive `signum` when the parent dies, however it
  dies (Linux prctl PR_SET_PDEATHSIG); elsewhere a no-op. For `preexec_fn`
  or the first line of a subprocess's main."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    pr_set_pdeathsig = 1
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(pr_set_pdeathsig, signum)
  except (OSError, AttributeError):
    pass


def seed_everything(seed: int, program: str) -> None:
  """Seeds Python, NumPy and TensorFlow from the run seed and the role.

  Roles get different streams (an actor's sampling must not mirror the
  evaluator's), and the same (seed, role) gives the same stream on a rerun.
  """
  if program not in ('learner', 'actor'):
    return  # The others sample nothing (and the launcher stays TF-free).
  import random  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from common import seeds  # pylint: disable=g-import-not-at-top
  path = [program]
  if 'task' in flags.FLAGS and 'mode' in flags.FLAGS:
    path += [flags.FLAGS.mode, flags.FLAGS.task]
  value = seeds.derive(seed, *path)
  random.seed(value)
  np.random.seed(value)
  tf.random.set_seed(value)


# The running program's name, as `run` was given it (for `exit_with_error`).
_program = None


class Watchdog:
  """Ends this process with one line after `seconds`, unless cancelled.

  A child shell does it (prints the line on our stderr, then SIGKILLs us):
  a Python timer thread cannot run while the main thread waits inside a
  C++ call that holds the GIL (TensorFlow joining its peer workers).
  """

  def __init__(self, seconds: float, program: str, message: str):
    import shlex  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    line = shlex.quote(f'{program}: error: {message}')
    self._proc = subprocess.Popen(
        ['sh', '-c', f'sleep {seconds:g}; echo {line} >&2; '
         f'kill -9 {os.getpid()}'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        preexec_fn=die_with_parent)

  def cancel(self) -> None:
    if self._proc.poll() is None:
      self._proc.kill()
    self._proc.wait()


def release_in_background(objects) -> None:
  """Drops the last references to `objects` on a daemon thread.

  Tearing down a Reverb client, writer or dataset that still holds a stream
  to a server that was killed can block inside C++ (seen: a learner whose
  replay shard was restarted hung after its final checkpoint, in the
  deallocation of its input pipeline). Done here, that wait keeps no caller
  from finishing; the process then ends with `exit_now`.
  """
  held = [objects]

  def release():
    time.sleep(1.0)  # The caller's own references are gone by then.
    held.clear()

  threading.Thread(target=release, daemon=True,
                   name='release-in-background').start()


def exit_now(code: int = 0) -> None:
  """Flushes the logs and ends the process without interpreter teardown
  (which would wait on objects stuck in C++, see `release_in_background`)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def exit_with_error(message: str) -> None:
  """Ends this process at once as `run` ends it for a UserError: one line,
  exit 2. For a thread that finds the main thread stuck in a call it cannot
  interrupt (a hung environment step)."""
  logging.flush()
  sys.stderr.write(f'{_program or "error"}: error: {message}\n')
  sys.stderr.flush()
  os._exit(2)  # pylint: disable=protected-access


def run(main, program: str):
  """Runs `main(argv)` under absl; a UserError becomes one line and exit 2."""
  global _program
  _program = program

  def _main(argv):
    if len(argv) > 1:
      sys.stderr.write(f'{program}: error: unexpected arguments {argv[1:]}; '
                       'flags are given as --name=value\n')
      sys.exit(2)
    if 'seed' in flags.FLAGS:
      seed_everything(flags.FLAGS.seed, program)
    try:
      main(argv)
    except UserError as e:
      logging.flush()
      sys.stderr.write(f'{program}: error: {e}\n')
      sys.stderr.flush()
      os._exit(2)  # pylint: disable=protected-access

  def _parse_flags(argv):
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      sys.stderr.write(f'{program}: error: {e} (see --helpfull)\n')
      sys.exit(2)
    if 'preset' in flags.FLAGS:
      from common import presets  # pylint: disable=g-import-not-at-top
      try:
        presets.apply(flags.FLAGS)
      except UserError as e:
        sys.stderr.write(f'{program}: error: {e}\n')
        sys.exit(2)
    return rest

  settings_flags = sys.modules.get('common.config_flags')
  if settings_flags is not None and program in settings_flags.ROLES:
    settings_flags.declare_key_flags(program)  # --help: the role's flags.
  app.run(_main, flags_parser=_parse_flags)
