"""A trajectory observer that waits on Reverb's rate limiter without going deaf.

TF-Agents' `ReverbAddTrajectoryObserver` leaves flushing to the writer, which
blocks for as long as the replay table's rate limiter refuses inserts. When the
learner has stopped sampling (finished, or gone) that is forever. This
observer bounds the items in flight and waits in short slices, asking
`should_stop()` between them, so an actor blocked by the limiter still notices
SIGTERM and the end of training.

It writes the items TF-Agents' observer writes (`tests/test_compat.py`
compares them), with less Python per step: that observer maps TF nests over
the writer's history for every item (the Reverb writer's Python layer and
`tf.nest` cost more than the C++ append, item and flush together); here each
step's column references go to the C++ writer directly, through
`common.compat.DirectTrajectoryWriter`.

It writes the layout the table's signature says (`--replay_layout`): stock,
a column per field of TF-Agents' Trajectory (chunked per column, as
TF-Agents' observer does), or packed, each item one float32 tensor [item
steps, fields] (`common.agents.packed_width`) appended as one step in a chunk
of its own, so the learner receives one chunk per item instead of one per
field and step (BENCHMARKS.md).
"""

import time
from typing import Callable, Optional

from absl import logging
import numpy as np
import reverb
from tf_agents.trajectories import time_step as ts
import tree

from common import agents
from common import compat
from common import table_names


class CollectionStopped(Exception):
  """Raised from inside a collect step when the actor should stop."""


def table_layout(py_client: reverb.Client, table: str) -> str:
  """'packed' or 'stock', as `table`'s signature says."""
  info = py_client.server_info(timeout=60).get(table)
  return 'packed' if info is not None and agents.is_packed(
      info.signature) else 'stock'


def _words(value) -> np.ndarray:
  """One field of a step as float32 words (`common.agents.packed_width`)."""
  value = np.asarray(value)
  if value.dtype.itemsize in (4, 8):
    return np.ascontiguousarray(value).reshape(-1).view(np.float32)
  return value.reshape(-1).astype(np.float32)


def packed_step(trajectory) -> np.ndarray:
  """A step's fields, `tree.flatten` order, as one float32 vector."""
  return np.concatenate([_words(x) for x in tree.flatten(trajectory)])


# Steps per chunk of each stock column. A sampled item costs the server and
# the learner per chunk it spans (Reverb sizes the response once per chunk
# added), so long chunks, which a 2-step item rarely straddles, are cheaper to
# sample than Reverb's auto-tuned ones: 1.15x the learner's and 1.45x the
# server's CPU per batch (`python -m bench.pipeline`, BENCHMARKS.md). An item
# reaches the table once its chunks are complete: at most this many steps
# after it was written (or at the episode's end).
STOCK_CHUNK_LENGTH = 16


class StoppableTrajectoryObserver:
  """Writes `sequence_length`-step items (stride 1) to the replay table.

  As TF-Agents' `ReverbAddTrajectoryObserver` (without padding) writes them:
  one item per step once `sequence_length` steps of the episode are in, none
  spanning two episodes. Interruptible while the rate limiter holds it;
  `update_priority` sets the priority of the items written from then on.

  `layout`: 'stock' or 'packed'; None, the one the table's signature says.
  `chunk_length`: steps per chunk, for every column; None: the layout's
  (`STOCK_CHUNK_LENGTH`; packed: 1, one item a chunk); 0: Reverb's auto-tuned
  length (what TF-Agents' observer gets).
  """

  def __init__(self, py_client: reverb.Client,
               should_stop: Callable[[], bool], sequence_length: int = 2,
               max_in_flight_items: int = 16, wait_slice_ms: int = 500,
               who: str = 'actor', layout: Optional[str] = None,
               chunk_length: Optional[int] = None,
               table: str = table_names.REPLAY_TABLE):
    self._py_client = py_client
    self._table_names = [table]
    self._sequence_length = sequence_length
    self._stride_length = table_names.STRIDE_LENGTH
    self._priority = 1.0
    self.layout = layout or table_layout(py_client, table)
    if self.layout not in ('stock', 'packed'):
      raise ValueError(f'layout {self.layout!r}: expected stock or packed')
    self._packed = self.layout == 'packed'
    # One more reference kept alive than an item spans, as TF-Agents' has;
    # a packed item is one reference.
    keep_alive = 2 if self._packed else sequence_length + 1
    if chunk_length is None:
      # Packed: a chunk holding other items is sent with each.
      chunk_length = 1 if self._packed else STOCK_CHUNK_LENGTH
    chunk_length = chunk_length or None  # 0: Reverb's auto-tuned length.
    self._chunk_options = None if chunk_length is None else dict(
        num_keep_alive_refs=max(keep_alive, chunk_length),
        max_chunk_length=chunk_length)
    self._writer = py_client.trajectory_writer(
        num_keep_alive_refs=max(keep_alive, chunk_length or 1),
        validate_items=False)
    self._direct = compat.DirectTrajectoryWriter(self._writer,
                                                 squeeze=self._packed)
    self._should_stop = should_stop
    self._max_in_flight = max_in_flight_items
    self._wait_slice_ms = wait_slice_ms
    self._who = who
    self.blocked_s = 0.0
    self._cached_steps = 0  # Steps of this episode so far.
    self._last_trajectory = None
    # The column references (stock) or packed fields (packed) of the last
    # `sequence_length` steps.
    self._steps = []

  @property
  def history(self):
    """The Reverb writer's history of this episode (`TrajectoryWriter`'s)."""
    return self._writer.history

  def __call__(self, trajectory) -> None:
    """Appends one step, writes its item, then waits for room."""
    self._last_trajectory = trajectory
    steps = self._steps
    if self._chunk_options is not None:
      self._configure_chunks(trajectory)
    steps.append(packed_step(trajectory) if self._packed else
                 self._direct.append(trajectory))
    if len(steps) > self._sequence_length:
      del steps[0]
    self._cached_steps += 1
    self._write_cached_steps()
    if trajectory.step_type == ts.StepType.LAST:  # is_boundary()
      self.reset(write_cached_steps=False)
    self._wait_for_room()

  def _write_cached_steps(self) -> None:
    """The item of the last `sequence_length` steps, every column, once the
    episode has that many (and on the stride)."""
    length = self._sequence_length
    if (self._cached_steps < length or
        (self._cached_steps - length) % self._stride_length):
      return
    if self._packed:
      columns = [self._direct.append(np.stack(self._steps[-length:]))]
    else:
      columns = [list(column) for column in zip(*self._steps[-length:])]
    for table in self._table_names:
      self._direct.create_item(table, self._priority, columns)

  def _configure_chunks(self, trajectory) -> None:
    """Every column's chunk length, before its first step."""
    paths = ([()] if self._packed else
             [path for path, _ in tree.flatten_with_path(trajectory)])
    for path in paths:
      self._writer.configure(path, **self._chunk_options)
    self._chunk_options = None

  def reset(self, write_cached_steps: bool = True) -> None:
    """Ends the episode; with `write_cached_steps`, writes its last item
    first (TF-Agents' observer's `reset`, without padding)."""
    if write_cached_steps and self._last_trajectory is not None:
      if (self._cached_steps < self._sequence_length or
          (self._cached_steps - self._sequence_length) % self._stride_length):
        raise ValueError(
            'write_cached_steps is True, but not enough steps remain in the '
            'cache to write an item with sequence_length='
            f'{self._sequence_length}')
      self._write_cached_steps()
    self._cached_steps = 0
    self._last_trajectory = None
    self._steps = []
    self._end_episode()

  def _end_episode(self) -> None:
    """Reverb's `end_episode`, retried in slices until it succeeds.

    It flushes first and raises DeadlineExceeded on a timeout *before* it
    starts a new episode and clears the history. So it is retried (the
    observer keeps at most a few items in flight, so that is short unless the
    learner has stopped sampling), asking `should_stop()` between slices.
    """
    self._wait(lambda slice_ms: self._writer.end_episode(
        True, timeout_ms=slice_ms))

  def flush(self) -> None:
    """Waits until every item written so far is on the server."""
    self._writer.flush()

  def close(self) -> None:
    """Sends the items still in unfinished chunks (while `should_stop()` is
    False, or in the first wait slice), then closes the writer; the observer
    is done.

    Always closes: a Reverb writer left to its destructor flushes with no
    timeout, which at interpreter exit has aborted the process ("terminate
    called without an active exception") or would wait forever on a rate
    limiter that no learner drains any more.
    """
    if self._writer is None:
      return
    try:
      self._end_episode()
    except CollectionStopped:
      logging.info('%s: stopped with items the replay table did not take; '
                   'they are dropped', self._who)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: the last items could not be sent (%s); they are '
                      'dropped', self._who, str(e).splitlines()[0][:200])
    finally:
      self._writer.close()
      self._writer = None

  def _wait_for_room(self) -> None:
    self._wait(lambda slice_ms: self._writer.flush(
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
            self._py_client.server_info(timeout=5)
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
    self._priority = float(priority)
