"""A localhost cluster: the project's binaries as named OS processes.

The fixture that the tests and the benchmarks (`bench/`) share: each process
logs to its own file under a directory of the caller's (a test's tmp dir, a
benchmark's work dir); whatever is still running at `stop_all` is terminated,
then killed. Readiness is read from the servers themselves
(`wait_for_server`), or, where a test checks a message, from a log line.
"""

import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, TypeVar

import portpicker

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small networks and batches: the behaviour under test does not depend on size.
TINY = [
    '--actor_fc_layers=32,32', '--critic_joint_fc_layers=32,32',
    '--batch_size=32', '--samples_per_insert=32', '--log_interval_s=2',
    '--server_timeout_s=120',
]


def free_port() -> int:
  return portpicker.pick_unused_port()


T = TypeVar('T')


def wait_until(condition: Callable[[], T], timeout: float,
               describe: Callable[[], str], interval: float = 0.5) -> T:
  """Polls `condition` until it returns a truthy value, at most `timeout` s.

  Tests wait on what they claim, never sleep a fixed time and then compare a
  count: a loaded CI machine is slower, not wrong. On timeout the assertion
  says `describe()` (what was awaited and what was seen).
  """
  deadline = time.monotonic() + timeout
  while True:
    value = condition()
    if value:
      return value
    if time.monotonic() >= deadline:
      raise AssertionError(f'not within {timeout}s: {describe()}')
    time.sleep(interval)


class Cluster:
  """A set of named child processes with log files."""

  def __init__(self, log_dir: str):
    self.log_dir = log_dir
    self.procs: Dict[str, subprocess.Popen] = {}
    self._logs = {}

  def start(self, name: str, module: str, args: List[str]) -> subprocess.Popen:
    """Runs `python -m module args` from the repository root as `name`."""
    return self.spawn(name, [sys.executable, '-m', module] + list(args))

  def spawn(self, name: str, argv: List[str], cwd: str = REPO_ROOT,
            env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Runs `argv` as `name`, in a session of its own, logging to
    `<log_dir>/<name>.log`; `env`: more environment variables."""
    path = os.path.join(self.log_dir, f'{name}.log')
    log = open(path, 'ab')
    proc = subprocess.Popen(
        list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})),
        start_new_session=True)
    self.procs[name] = proc
    self._logs[name] = (path, log)
    return proc

  def log(self, name: str) -> str:
    with open(self._logs[name][0], errors='replace') as f:
      return f.read()

  def wait_for_server(self, name: str, address: str, timeout: float) -> None:
    """Waits until the Reverb server that process `name` runs at `address`
    answers `server_info` (it serves its tables); raises if it exits first."""
    import reverb  # pylint: disable=g-import-not-at-top
    deadline = time.monotonic() + timeout
    while True:
      try:
        reverb.Client(address).server_info(timeout=2)
        return
      except Exception:  # pylint: disable=broad-except
        pass  # Not listening yet.
      if self.procs[name].poll() is not None:
        raise AssertionError(f'{name} exited ({self.procs[name].returncode}) '
                             f'before serving at {address}:\n'
                             f'{self.tail(name)}')
      if time.monotonic() >= deadline:
        raise AssertionError(f'{name} did not serve at {address} in '
                             f'{timeout}s:\n{self.tail(name)}')
      time.sleep(0.5)

  def wait(self, name: str, timeout: float) -> int:
    try:
      return self.procs[name].wait(timeout)
    except subprocess.TimeoutExpired:
      raise AssertionError(f'{name} still running after {timeout}s:\n'
                           f'{self.tail(name)}') from None

  def tail(self, name: str, lines: int = 40) -> str:
    return '\n'.join(self.log(name).splitlines()[-lines:])

  def signal(self, name: str, sig=signal.SIGTERM) -> None:
    self.procs[name].send_signal(sig)

  def stop_all(self) -> None:
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in self.procs.values():
      try:
        proc.wait(max(0.1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for _, log in self._logs.values():
      log.close()


def processes_naming(root_dir: str, exclude=()) -> Dict[int, List[str]]:
  """{pid: argv} of running processes whose command line has this root_dir."""
  out = subprocess.run(['pgrep', '-f', '--', f'--root_dir={root_dir}'],
                       capture_output=True, text=True).stdout
  found = {}
  for pid in map(int, out.split()):
    if pid in exclude:
      continue
    try:
      with open(f'/proc/{pid}/cmdline') as f:
        found[pid] = f.read().rstrip('\0').split('\0')
    except OSError:
      pass  # Exited meanwhile.
  return found


def table_size(address: str, table: str = 'uniform_table') -> Optional[int]:
  import reverb  # pylint: disable=g-import-not-at-top
  try:
    return reverb.Client(address).server_info(timeout=2)[table].current_size
  except Exception:  # pylint: disable=broad-except
    return None
