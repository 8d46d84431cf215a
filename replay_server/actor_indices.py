"""`--task=auto` actor indices, the server's side: the queue of free indices.

An index is a lease: its actor renews it every ACTOR_LEASE_INTERVAL_S on the
shard that handed it out, and the server hands an index out again once its
lease has not been renewed for `lease_timeout_s` (the actor is gone). Without
that every restarted actor took a new index: past --num_actors the Ape-X
epsilon goes greedy, the shard an actor writes to moves, and after
MAX_ACTOR_IDS restarts none is left. Indices are handed out lowest first, so
a restarted actor gets its old index back once the old lease has expired.

With S replay shards, shard k hands out only the indices i with i mod S == k
(`table_names.shard_of`): an index names the shard that handed it out, the
shard its actor renews it on and the shard its actor writes to, and no
shard's loss takes the others' indices with it. The actors' side (claims and
renewals) is `actor.actor_index`.
"""

import time
from typing import Dict, List

from absl import logging
import numpy as np
import reverb

from common import table_names
from variable_container import one_value


def fill_actor_ids(address: str) -> int:
  """Queues the indices 0, 1, ... for `--task=auto` actors (a server without
  leases, e.g. in tests; `serve` uses `ActorIndices`).

  Does nothing if the queue is not empty (restored from a checkpoint).
  Returns the number of indices queued.
  """
  return _queue_actor_ids(address, range(table_names.MAX_ACTOR_IDS),
                          only_if_empty=True)


def _queue_actor_ids(address: str, indices, only_if_empty: bool = False) -> int:
  client = reverb.Client(address)
  if (only_if_empty and
      client.server_info()[table_names.ACTOR_ID_TABLE].current_size):
    return 0  # Restored from a checkpoint: keep the indices not yet taken.
  with client.writer(max_sequence_length=1) as writer:
    for index in indices:
      writer.append(np.int64(index))
      writer.create_item(table_names.ACTOR_ID_TABLE, num_timesteps=1,
                         priority=1.0)
  return len(indices)


class ActorIndices:
  """The server's side of `--task=auto`: hands out indices no live actor holds.

  Shard `shard` of `num_shards` owns the indices i with i mod num_shards ==
  shard. At start it takes over the queue (the indices restored from a
  checkpoint were free; the others were taken and are held until their lease
  expires), then waits `grace_s` while live actors renew their leases
  (without a checkpoint it cannot know which indices they hold: handing out
  index 0 again while actor 0 still runs would give two actors one index and
  one seed). From then on it keeps the `table_names.QUEUE_DEPTH` lowest free
  indices in the queue, in order, and hands back an index whose lease has
  not been renewed for `lease_timeout_s`.

  It knows what it queued, in order, and Reverb's queue hands items out
  first in, first out: the queue's size tells which of them were taken.
  """

  def __init__(self, address: str, grace_s: float, shard: int = 0,
               num_shards: int = 1, lease_timeout_s: float = 30.0):
    if not 0 <= shard < num_shards:
      raise ValueError(f'shard {shard} of {num_shards}')
    self._address = address
    self._client = reverb.Client(address)
    self._lease_timeout_s = lease_timeout_s
    self._universe = range(shard, table_names.MAX_ACTOR_IDS, num_shards)
    self._mine = mine = set(self._universe)
    queued = one_value.take_int64s(address, table_names.ACTOR_ID_TABLE, 200,
                                   limit=None, max_in_flight=256)
    restored = [i for i in queued if i in mine]
    now = time.monotonic()
    # index -> when its lease was last renewed (or the index taken).
    self._leases: Dict[int, float] = (
        {i: now for i in mine - set(restored)} if restored else {})
    self._queued: List[int] = []  # In the queue, oldest first.
    self.renewed = set()  # Renewed at least once since this server started.
    self._ready_at = now + grace_s
    self.queued = False  # The grace is over; indices are handed out.
    self._restored = bool(restored)

  @property
  def held(self) -> List[int]:
    """Indices taken or renewed whose lease has not expired."""
    return sorted(self._leases)

  def poll(self) -> None:
    """Reads lease renewals; after the grace, hands back expired indices and
    keeps the lowest free ones queued."""
    info = self._client.server_info(timeout=5)
    size = info[table_names.ACTOR_LEASE_TABLE].current_size
    renewed = set(one_value.take_int64s(
        self._address, table_names.ACTOR_LEASE_TABLE, 100, limit=size,
        max_in_flight=64)) if size else set()
    now = time.monotonic()
    # A fixed --task renews here too (on the shard of its residue class).
    renewed &= self._mine
    for index in renewed:
      self._leases[index] = now
    self.renewed |= renewed
    if not self.queued:
      if now < self._ready_at:
        return
      self.queued = True
      free = self._free()
      logging.info('actor indices: %d free from %d on%s; held by live actors: '
                   '%s', len(free), free[0] if free else -1,
                   ' (restored)' if self._restored else '',
                   sorted(self.renewed & set(self._leases)) or 'none')
    self._taken(info[table_names.ACTOR_ID_TABLE].current_size, now)
    expired = sorted(i for i, at in self._leases.items()
                     if now - at > self._lease_timeout_s)
    for index in expired:
      del self._leases[index]
    if expired:
      logging.info('actor indices: handing back %s (not renewed for %gs)',
                   expired, self._lease_timeout_s)
    self._refill(now)

  def _free(self) -> List[int]:
    """Free indices, lowest first: neither held nor in the queue."""
    queued = set(self._queued)
    return [i for i in self._universe
            if i not in self._leases and i not in queued]

  def _taken(self, queue_size: int, now: float) -> None:
    """The queued indices actors took since the last look: held from now."""
    taken = len(self._queued) - queue_size
    if taken <= 0:
      return
    for index in self._queued[:taken]:
      self._leases[index] = now
    del self._queued[:taken]

  def _refill(self, now: float) -> None:
    """Queues the lowest free indices; reorders when a lower one came free."""
    depth = table_names.QUEUE_DEPTH
    wanted = sorted(self._queued + self._free()[:depth])[:depth]
    if self._queued != wanted[:len(self._queued)]:
      # An index below the queued ones came free (its actor is gone): take the
      # queue back, so that the next actor gets the lowest index.
      back = set(one_value.take_int64s(self._address,
                                       table_names.ACTOR_ID_TABLE, 200,
                                       limit=len(self._queued)))
      # A sample still in flight gives up (after 200 ms) before new items
      # come, or it would take one of them unseen.
      time.sleep(0.3)
      size = self._client.server_info(
          timeout=5)[table_names.ACTOR_ID_TABLE].current_size
      gone = self._queued[:len(self._queued) - size]
      del self._queued[:len(self._queued) - size]
      for index in gone:
        if index not in back:  # Taken by an actor meanwhile: held.
          self._leases[index] = now
      wanted = sorted(self._queued + self._free()[:depth])[:depth]
    new = wanted[len(self._queued):]
    if self._queued != wanted[:len(self._queued)]:
      new = self._free()[:max(0, depth - len(self._queued))]
    if new:
      _queue_actor_ids(self._address, new)
      self._queued.extend(new)
