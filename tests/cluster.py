"""The localhost cluster of launcher/local_cluster.py, plus what only tests of
log messages need: waiting for a message in a process's log."""

import re
import time

from launcher import local_cluster


class Cluster(local_cluster.Cluster):
  """Binaries as OS processes; tests may wait for a log message of theirs."""

  def wait_for_log(self, name: str, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      m = re.search(pattern, self.log(name))
      if m:
        return m
      if self.procs[name].poll() is not None:
        m = re.search(pattern, self.log(name))
        if m:
          return m
        raise AssertionError(f'{name} exited ({self.procs[name].returncode}) '
                             f'before logging {pattern!r}:\n'
                             f'{self.tail(name)}')
      time.sleep(0.5)
    raise AssertionError(f'{name} did not log {pattern!r} in {timeout}s:\n'
                         f'{self.tail(name)}')
