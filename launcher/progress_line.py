"""The launcher's progress line, kept current from status data.

Owns what the line says and where it comes from: the learner's train step
and rate and the evaluator's latest return (their status tables on the
replay server), and the actors' collection rate (the replay table's insert
count, its growth over the last `window_s`). A status feed child
(launcher/status_feed.py) reads them; each of its JSON readings updates the
line. Never log text: rewording a child's log message changes nothing in it.
"""

import collections
import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Optional, Sequence

from common import process
from common import progress
from common.errors import one_line


class ProgressLine:
  """The numbers of the progress line, and the feed that brings them.

  Without replay addresses there is no feed and the line shows zeros; with
  them, `start(log_dir)` starts the feed and `stop()` ends it. `update()`
  takes one reading (what the feed writes), so that tests can give readings
  of their own.
  """

  def __init__(self, train_steps: int, replay_addresses: Sequence[str] = (),
               window_s: float = 10.0, poll_interval_s: float = 1.0,
               report: Callable[[str], None] = lambda text: None):
    """`report` gets the one line saying that the feed failed."""
    self.train_steps = train_steps
    self.replay_addresses = list(replay_addresses)
    self.window_s = window_s
    self.poll_interval_s = poll_interval_s
    self._report = report
    self.train_step = 0
    self.train_rate = 0.0
    self.env_rate = 0.0
    self.average_return: Optional[float] = None
    self.eval_step: Optional[int] = None
    self._inserts = collections.deque()  # (time, {address: count})
    self._lock = threading.Condition()
    self._answered = 0  # Readings that answered a `refresh()`.
    self._feed: Optional[subprocess.Popen] = None
    self._stopping = False

  # --- the numbers
  def update(self, reading: Dict, now: Optional[float] = None) -> None:
    """Takes one reading; a role missing from it keeps what it said last."""
    now = time.monotonic() if now is None else now
    with self._lock:
      learner = reading.get('learner')
      if learner:
        self.train_step = int(learner.get('train_step', self.train_step))
        self.train_rate = float(learner.get('steps_per_s', self.train_rate))
      evaluator = reading.get('evaluator')
      if evaluator and evaluator.get('average_return') is not None:
        self.eval_step = int(evaluator['train_step'])
        self.average_return = float(evaluator['average_return'])
      self._count_inserts(now, reading.get('inserted_items') or {})
      if reading.get('requested'):
        self._answered += 1
      self._lock.notify_all()

  def _count_inserts(self, now: float, counts: Dict[str, int]) -> None:
    self._inserts.append((now, counts))
    # Keep the newest reading at least `window_s` old as the window's start.
    while (len(self._inserts) > 2 and
           now - self._inserts[1][0] >= self.window_s):
      self._inserts.popleft()
    start, end = self._inserts[0][0], self._inserts[-1][0]
    if end > start:
      readings = [counts for _, counts in self._inserts]
      # Each shard counts its own growth from one reading to the next: one
      # that restarted (its count fell) or went away adds nothing in between.
      grown = sum(max(0, after[a] - before[a])
                  for before, after in zip(readings, readings[1:])
                  for a in after if a in before)
      self.env_rate = grown / (end - start)

  def line(self, actors: int, elapsed_s: float) -> str:
    """The line itself; `actors` is how many actors are collecting."""
    with self._lock:
      ret = ('-' if self.average_return is None else
             f'{self.average_return:.2f} (at step {self.eval_step})')
      eta = progress.format_duration(
          (self.train_steps - self.train_step) / self.train_rate
      ) if self.train_rate > 0 else '?'
      pct = 100.0 * self.train_step / max(1, self.train_steps)
      return (f'[launcher] train_step {self.train_step}/{self.train_steps} '
              f'({pct:.1f}%) | {self.train_rate:.1f} train steps/s | '
              f'{self.env_rate:.1f} env steps/s ({actors} actors) | '
              f'AverageReturn {ret} | elapsed '
              f'{progress.format_duration(elapsed_s)} | ETA {eta}')

  # --- the feed
  def feed_running(self) -> bool:
    return self._feed is not None and self._feed.poll() is None

  def start(self, log_dir: str) -> None:
    """Starts the feed (if there are replay addresses); its stderr (Reverb's
    and TensorFlow's start-up) goes to status_feed.log in `log_dir`."""
    if not self.replay_addresses:
      return
    try:
      stderr = open(os.path.join(log_dir, 'status_feed.log'), 'ab')
    except OSError:
      stderr = subprocess.DEVNULL
    self._feed = subprocess.Popen(
        [sys.executable, '-m', 'launcher.status_feed',
         ','.join(self.replay_addresses),
         f'--interval_s={self.poll_interval_s}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        # Like the children: no terminal Ctrl-C, gone with the launcher.
        start_new_session=True, preexec_fn=process.die_with_parent)
    if stderr is not subprocess.DEVNULL:
      stderr.close()
    threading.Thread(target=self._read_feed, args=(self._feed,),
                     daemon=True).start()

  def _read_feed(self, feed: subprocess.Popen) -> None:
    for raw in feed.stdout:
      try:
        reading = json.loads(raw)
      except ValueError:
        continue  # Not a reading (the feed writes nothing else).
      self.update(reading)
    code = feed.wait()
    if not self._stopping:
      self._report(f'[launcher] error: the status feed exited with code '
                   f'{code}; the progress line stops changing (see '
                   'status_feed.log beside the child logs)')

  def refresh(self, timeout_s: float = 5.0) -> None:
    """Waits, at most `timeout_s`, for a reading taken now (the learner's
    last status, read while the servers still serve it)."""
    feed = self._feed
    if feed is None or feed.poll() is not None:
      return
    with self._lock:
      answered = self._answered
    try:
      feed.stdin.write(b'\n')
      feed.stdin.flush()
    except OSError as e:
      self._report(f'[launcher] error: cannot ask the status feed for a '
                   f'reading ({one_line(e)})')
      return
    with self._lock:
      self._lock.wait_for(lambda: self._answered > answered, timeout_s)

  def stop(self) -> None:
    """Ends the feed: its stdin closes, it exits (killed after 5s)."""
    feed, self._stopping = self._feed, True
    if feed is None:
      return
    try:
      feed.stdin.close()
    except OSError:
      pass
    try:
      feed.wait(5)
    except subprocess.TimeoutExpired:
      feed.kill()
      feed.wait()
