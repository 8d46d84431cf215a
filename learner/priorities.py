"""Prioritized replay on the learner's side: the train step, importance
weights and priority updates.

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

from common import agents
from common import config as config_lib
from common import table_names

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


def prioritized_train_step(agent, agent_config: config_lib.AgentConfig,
                           updater: 'PriorityUpdater', exponent: float,
                           train_steps: int):
  """The train step on a prioritized table: `fn(experience, sample_info)`.

  Trains `agent` with importance-sampling weights from each item's sampling
  probability (their exponent annealed from `exponent` to 1 over
  `train_steps`), hands each item's |TD error| to `updater` as its new
  priority, and returns the agent's `LossInfo`. `train_step.Learner` runs it
  in place of `agent.train`.
  """
  train_with_td_errors = agents.train_with_td_errors(agent, agent_config)
  train_step = agent.train_step_counter

  def train(experience, sample_info):
    beta = annealed_exponent(exponent, train_step, train_steps)
    weights = importance_weights(sample_info.probability,
                                 sample_info.table_size, beta)
    loss_info, td_errors = train_with_td_errors(experience, weights)
    updater.send(sample_info.key, td_errors)
    return loss_info

  return train


class PriorityUpdater:
  """Writes priorities to the replay table from background threads.

  `send(keys, td_errors)` is called inside the train step; through
  `tf.numpy_function`, `submit` only queues. A thread merges what is queued,
  sends one `mutate_priorities` per round, and publishes the largest priority
  of its recent rounds to the `max_priority` table, where actors read the
  priority new items enter with. Priorities are advice: if a queue is full
  or a server is away, updates are dropped (counted, logged), never waited
  for.

  With replay shards, each round goes to every shard: a sampled key lives on
  exactly one of them (keys are random 64-bit ids) and Reverb skips keys a
  table does not hold, so no shard bookkeeping rides through the train step.
  Each shard has a queue and a thread of its own: a call to a shard that is
  gone blocks until it is back (Reverb's client waits for the server), and
  must not hold up the others. Each shard's thread publishes the max
  priority on its own shard (actors read their shard's), so no shard is
  needed by the others. `updated` and `dropped` count per shard (an update
  written to two shards counts twice).

  A non-finite |TD error| (NaN, inf) is never sent: Reverb would take it, and
  an inf would become the max priority every new item enters with. Such
  priorities are dropped in `submit` (counted in `non_finite`, logged once).
  """

  def __init__(self, address: Union[str, Sequence[str]],
               max_pending: int = 256, window: int = 100):
    addresses = [address] if isinstance(address, str) else list(address)
    self._writers = [_ShardWriter(a, max_pending, window)
                     for a in addresses]
    self.non_finite = 0

  @property
  def updated(self) -> int:
    return sum(w.updated for w in self._writers)

  @property
  def dropped(self) -> int:
    return sum(w.dropped for w in self._writers)

  def start(self) -> 'PriorityUpdater':
    for writer in self._writers:
      writer.start()
    return self

  def stop(self, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    for writer in self._writers:
      writer.done.set()
    for writer in self._writers:
      writer.join(max(0.0, deadline - time.monotonic()))

  def submit(self, keys: np.ndarray, td_errors: np.ndarray) -> np.int64:
    keys = np.array(keys, np.uint64).reshape(-1)
    td_errors = np.array(td_errors, np.float64).reshape(-1)
    finite = np.isfinite(td_errors)
    if not finite.all():
      if not self.non_finite:
        logging.warning('learner: %d of %d TD errors are NaN or inf; their '
                        'priorities are not sent (the items keep theirs). '
                        'The loss check ends training if the loss follows',
                        int((~finite).sum()), len(td_errors))
      self.non_finite += int((~finite).sum())
      keys, td_errors = keys[finite], td_errors[finite]
      if not len(keys):
        return np.int64(0)
    update = (keys, td_errors)
    for writer in self._writers:
      writer.put(update)
    return np.int64(0)

  def send(self, keys: tf.Tensor, td_errors: tf.Tensor) -> None:
    """`submit` from inside a train step (a tf.function)."""
    tf.numpy_function(self.submit, [keys, td_errors], tf.int64,
                      stateful=True)


class _ShardWriter(threading.Thread):
  """One shard's queue of priority updates and the thread that sends them.

  `window` > 0: also publishes the max priority of the last `window` rounds
  on this shard.
  """

  def __init__(self, address: str, max_pending: int, window: int):
    super().__init__(daemon=True, name=f'priority-updater {address}')
    self._address = address
    self._queue = queue.Queue(maxsize=max_pending)
    self._recent_max = collections.deque(maxlen=window) if window else None
    self._published = None
    self._last_publish = 0.0
    self.updated = 0
    self.dropped = 0
    self.done = threading.Event()

  def put(self, update) -> None:
    try:
      self._queue.put_nowait(update)
    except queue.Full:
      self.dropped += len(update[0])

  def run(self) -> None:
    client = None
    failures = 0
    while not self.done.is_set() or not self._queue.empty():
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
        client = client or reverb.Client(self._address)
        client.mutate_priorities(table_names.REPLAY_TABLE, updates=updates)
        self.updated += len(updates)
        if self._recent_max is not None:
          self._recent_max.append(float(priorities.max()))
          self._publish_max(client)
        failures = 0
      except Exception as e:  # pylint: disable=broad-except
        client = None
        self.dropped += len(updates)
        failures += 1
        if failures in (1, 10) or failures % 100 == 0:
          logging.warning('learner: cannot update priorities at %s (%s); '
                          '%d dropped so far, training goes on',
                          self._address, type(e).__name__, self.dropped)

  def _publish_max(self, client: reverb.Client) -> None:
    now = time.monotonic()
    value = max(self._recent_max)
    if not np.isfinite(value):  # `submit` lets none through; never publish.
      return
    if (self._published is not None and now - self._last_publish < 1.0 and
        abs(value - self._published) <= 0.05 * self._published):
      return
    client.insert(np.float64(value),
                  priorities={table_names.MAX_PRIORITY_TABLE: 1.0})
    self._published, self._last_publish = value, now
