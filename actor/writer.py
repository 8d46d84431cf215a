"""A trajectory observer that waits on Reverb's rate limiter without going deaf.

TF-Agents' `ReverbAddTrajectoryObserver` leaves flushing to the writer, which
blocks for as long as the replay table's rate limiter refuses inserts. When the
learner has stopped sampling (finished, or gone) that is forever. This
observer bounds the items in flight and waits in short slices, asking
`should_stop()` between them, so an actor blocked by the limiter still notices
SIGTERM and the end of training.
"""

import time
from typing import Callable

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.replay_buffers import reverb_utils

from common import config as config_lib


class CollectionStopped(Exception):
  """Raised from inside a collect step when the actor should stop."""


class _InterruptibleEndEpisode:
  """Wraps a TrajectoryWriter so `end_episode` waits in slices, interruptibly.

  Reverb's `end_episode` flushes first and raises DeadlineExceeded on a
  timeout *before* it starts a new episode and clears the history. So it is
  retried until it succeeds (the observer keeps at most a few items in
  flight, so that is short unless the learner has stopped sampling), asking
  `should_stop()` between slices.
  """

  def __init__(self, writer, observer: 'StoppableTrajectoryObserver'):
    self._writer = writer
    self._observer = observer

  def __getattr__(self, name):
    return getattr(self._writer, name)

  def end_episode(self, clear_buffers: bool = True, timeout_ms=None):
    del timeout_ms
    self._observer._wait(  # pylint: disable=protected-access
        lambda slice_ms: self._writer.end_episode(clear_buffers,
                                                  timeout_ms=slice_ms))


class StoppableTrajectoryObserver(reverb_utils.ReverbAddTrajectoryObserver):
  """Writes `sequence_length`-step items (stride 1) to `uniform_table`.

  Interruptible while the rate limiter holds it; `update_priority` sets the
  priority of the items written from then on.
  """

  def __init__(self, py_client: reverb.Client,
               should_stop: Callable[[], bool], sequence_length: int = 2,
               max_in_flight_items: int = 16, wait_slice_ms: int = 500,
               who: str = 'actor'):
    super().__init__(py_client, config_lib.REPLAY_TABLE,
                     sequence_length=sequence_length,
                     stride_length=config_lib.STRIDE_LENGTH)
    self._writer = _InterruptibleEndEpisode(self._writer, self)
    self._should_stop = should_stop
    self._max_in_flight = max_in_flight_items
    self._wait_slice_ms = wait_slice_ms
    self._who = who
    self.blocked_s = 0.0

  def __call__(self, trajectory) -> None:
    super().__call__(trajectory)
    self._wait_for_room()

  def _wait_for_room(self) -> None:
    self._wait(lambda slice_ms: self._get_writer().flush(
        self._max_in_flight, timeout_ms=slice_ms))

  def _wait(self, attempt) -> None:
    """Calls `attempt(slice_ms)` until it stops timing out; interruptible."""
    start = None
    last_log = 0.0
    while True:
      try:
        attempt(self._wait_slice_ms)
        break
      except reverb.errors.DeadlineExceededError:
        now = time.monotonic()
        start = start or now
        if self._should_stop():
          raise CollectionStopped() from None
        if now - start - last_log >= 30:
          last_log = now - start
          try:
            self.py_client.server_info(timeout=5)
            logging.info('%s: replay table is rate-limiting inserts for '
                         '%.0fs (the learner samples slower than actors '
                         'insert, or has stopped)', self._who, last_log)
          except Exception:  # pylint: disable=broad-except
            logging.warning('%s: replay server unreachable for %.0fs; '
                            'waiting for it to come back (the writer '
                            'reconnects and resends)', self._who, last_log)
    if start is not None:
      self.blocked_s += time.monotonic() - start

  def discard_partial_episode(self) -> None:
    """Drops cached steps so the next item cannot span two episodes."""
    self.reset(write_cached_steps=False)

  def update_priority(self, priority: float) -> None:
    """The priority of the items written from now on."""
    self._priority = float(priority)  # Read by the base class per item.


class UnbatchingObserver:
  """Feeds item i of a batched trajectory to observer i (one writer each).

  Reverb's trajectory observers take one environment's steps; an actor that
  steps several environments together splits each batch here.
  """

  def __init__(self, observers):
    self._observers = observers

  def __call__(self, trajectory) -> None:
    for i, observer in enumerate(self._observers):
      observer(tf.nest.map_structure(lambda x, i=i: x[i], trajectory))

  @property
  def blocked_s(self) -> float:
    return sum(o.blocked_s for o in self._observers)

  def discard_partial_episode(self) -> None:
    for observer in self._observers:
      observer.discard_partial_episode()

  def update_priority(self, priority: float) -> None:
    for observer in self._observers:
      observer.update_priority(priority)
