"""Prioritized replay on the learner's side: importance weights and priority updates.

The learner samples with the probabilities of the table's `Prioritized`
selector, corrects for them with importance-sampling weights, and writes
each sampled item's |TD error| back as its new priority. The writes go
through a queue to a thread of their own: a train step only hands over its
keys and TD errors (a copy of 2 x batch numbers) and never waits on Reverb.
"""

import collections
import queue
import threading
import time
from typing import Sequence, Union

from absl import logging
import numpy as np
import reverb
import tensorflow as tf

from common import config as config_lib

# Added to every priority, so that no item's probability becomes 0.
PRIORITY_EPSILON = 1e-6


def importance_weights(probability, table_size, beta):
  """(N * P(i)) ** -beta, divided by the batch's largest (Schaul et al.)."""
  scaled = tf.cast(table_size, tf.float64) * tf.cast(probability, tf.float64)
  weights = tf.pow(tf.maximum(scaled, 1e-12), -tf.cast(beta, tf.float64))
  return tf.cast(weights / tf.reduce_max(weights), tf.float32)


def annealed_exponent(start: float, train_step, train_steps: int):
  """The IS exponent: `start` at step 0, linearly to 1 at `train_steps`."""
  progress = tf.minimum(
      tf.cast(train_step, tf.float32) / float(max(1, train_steps)), 1.0)
  return start + (1.0 - start) * progress


class PriorityUpdater:
  """Writes priorities to the replay table from a background thread.

  `submit(keys, td_errors)` is called from inside the train step (via
  `tf.numpy_function`); it only queues. The thread merges what is queued,
  sends one `mutate_priorities` per round, and publishes the largest priority
  of its recent rounds to the `max_priority` table, where actors read the
  priority new items enter with. Priorities are advice: if the queue is full
  or the server is away, updates are dropped (counted, logged), never waited
  for.

  With replay shards, each round goes to every shard: a sampled key lives on
  exactly one of them (keys are random 64-bit ids) and Reverb skips keys a
  table does not hold, so no shard bookkeeping rides through the train step.
  The max priority is published on the first shard.
  """

  def __init__(self, address: Union[str, Sequence[str]],
               max_pending: int = 256, window: int = 100):
    self._addresses = [address] if isinstance(address, str) else list(address)
    self._queue = queue.Queue(maxsize=max_pending)
    self._recent_max = collections.deque(maxlen=window)
    self._published = None
    self._last_publish = 0.0
    self.updated = 0
    self.dropped = 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='priority-updater')

  def start(self) -> 'PriorityUpdater':
    self._thread.start()
    return self

  def stop(self, timeout_s: float = 5.0) -> None:
    self._done.set()
    self._thread.join(timeout_s)

  def submit(self, keys: np.ndarray, td_errors: np.ndarray) -> np.int64:
    try:
      self._queue.put_nowait((np.array(keys, np.uint64),
                              np.array(td_errors, np.float64)))
    except queue.Full:
      self.dropped += len(keys)
    return np.int64(0)

  def send_from_train_step(self, experience_and_info, loss_info) -> None:
    """The Learner's `after_train_strategy_step_fn` (runs inside tf.function)."""
    _, sample_info = experience_and_info
    _, td_errors = loss_info.extra
    tf.numpy_function(self.submit, [sample_info.key, td_errors], tf.int64,
                      stateful=True)

  def _run(self) -> None:
    clients = None
    failures = 0
    while not self._done.is_set() or not self._queue.empty():
      try:
        keys, td_errors = self._queue.get(timeout=0.2)
      except queue.Empty:
        continue
      batches = [(keys, td_errors)]
      while True:
        try:
          batches.append(self._queue.get_nowait())
        except queue.Empty:
          break
      keys = np.concatenate([k for k, _ in batches])
      priorities = np.concatenate([p for _, p in batches]) + PRIORITY_EPSILON
      # An item sampled twice keeps its latest priority.
      updates = dict(zip(keys.tolist(), priorities.tolist()))
      try:
        clients = clients or [reverb.Client(a) for a in self._addresses]
        for client in clients:
          client.mutate_priorities(config_lib.REPLAY_TABLE, updates=updates)
        self.updated += len(updates)
        self._recent_max.append(float(priorities.max()))
        self._publish_max(clients[0])
        failures = 0
      except Exception as e:  # pylint: disable=broad-except
        clients = None
        self.dropped += len(updates)
        failures += 1
        if failures in (1, 10) or failures % 100 == 0:
          logging.warning('learner: cannot update priorities at %s (%s); '
                          '%d dropped so far, training goes on',
                          ', '.join(self._addresses), type(e).__name__,
                          self.dropped)

  def _publish_max(self, client: reverb.Client) -> None:
    now = time.monotonic()
    value = max(self._recent_max)
    if (self._published is not None and now - self._last_publish < 1.0 and
        abs(value - self._published) <= 0.05 * self._published):
      return
    client.insert(np.float64(value),
                  priorities={config_lib.MAX_PRIORITY_TABLE: 1.0})
    self._published, self._last_publish = value, now
