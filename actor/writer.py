"""A trajectory observer that waits on Reverb's rate limiter without going deaf.

TF-Agents' `ReverbAddTrajectoryObserver` leaves flushing to the writer, which
blocks for as long as the replay table's rate limiter refuses inserts. When the
learner has stopped sampling (finished, or gone) that is forever. This
observer bounds the items in flight and waits in short slices, asking
`should_stop()` between them, so an actor blocked by the limiter still notices
SIGTERM and the end of training.

It writes the same items as its base class, with less Python per step: the
base class maps TF nests over the writer's history for every item (the
Reverb writer's Python layer and `tf.nest` cost more than the C++ append,
item and flush together); here each step's column references go to the C++
writer directly.
"""

import time
from typing import Callable

from absl import logging
import reverb
from tf_agents.replay_buffers import reverb_utils
from tf_agents.trajectories import time_step as ts
import tree

from common import table_names


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
    super().__init__(py_client, table_names.REPLAY_TABLE,
                     sequence_length=sequence_length,
                     stride_length=table_names.STRIDE_LENGTH)
    self._py_writer = self._writer  # reverb.TrajectoryWriter
    self._cpp_writer = self._writer._writer  # pylint: disable=protected-access
    self._writer = _InterruptibleEndEpisode(self._writer, self)
    self._should_stop = should_stop
    self._max_in_flight = max_in_flight_items
    self._wait_slice_ms = wait_slice_ms
    self._who = who
    self.blocked_s = 0.0
    # The column references of the last `sequence_length` steps.
    self._steps = []
    self._columns = None  # The Python writer's column histories, once known.

  def __call__(self, trajectory) -> None:
    """`ReverbAddTrajectoryObserver.__call__`, then waits for room."""
    self._last_trajectory = trajectory
    writer = self._py_writer
    if self._columns is None:
      # The first step goes through the Python writer, which lays out the
      # columns (in `tree.flatten` order, checked here) and their histories.
      writer.append(trajectory)
      paths = [path for path, _ in tree.flatten_with_path(trajectory)]
      if [writer._path_to_column_index.get(p) for p in paths] != list(  # pylint: disable=protected-access
          range(len(paths))):
        raise ValueError(f'unexpected Reverb column order for {paths}')
      self._columns = writer._column_history  # pylint: disable=protected-access
      refs = [column._data_references[-1] for column in self._columns]  # pylint: disable=protected-access
    else:
      refs = self._cpp_writer.Append(tree.flatten(trajectory))
      # Kept in the Python writer's history too (what `history` shows).
      for column, ref in zip(self._columns, refs):
        column.append(ref)
    steps = self._steps
    steps.append(refs)
    if len(steps) > self._sequence_length:
      del steps[0]
    self._cached_steps += 1
    self._write_cached_steps()
    if trajectory.step_type == ts.StepType.LAST:  # is_boundary()
      self.reset(write_cached_steps=False)
    self._wait_for_room()

  def _write_cached_steps(self) -> None:
    """The base class's item: the last `sequence_length` steps, every column."""
    if not self._sequence_lengths_reached():
      return
    steps = self._steps[-self._sequence_length:]
    columns = [list(column) for column in zip(*steps)]
    squeeze = [False] * len(columns)
    for table in self._table_names:
      self._cpp_writer.CreateItem(table, self._priority, columns, squeeze)

  def reset(self, write_cached_steps: bool = True) -> None:
    super().reset(write_cached_steps)
    self._steps = []

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
