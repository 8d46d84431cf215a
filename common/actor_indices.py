"""`--task=auto` actor indices: the server's queue of free indices and the
actors' claims and lease renewals.

An index is a lease: its actor renews it every ACTOR_LEASE_INTERVAL_S on the
shard that handed it out, and the server hands an index out again once its
lease has not been renewed for `lease_timeout_s` (the actor is gone). Without
that every restarted actor took a new index: past --num_actors the Ape-X
epsilon goes greedy, the shard an actor writes to moves, and after
MAX_ACTOR_IDS restarts none is left. Indices are handed out lowest first, so
a restarted actor gets its old index back once the old lease has expired.

With S replay shards, shard k hands out only the indices i with i mod S == k:
an index names the shard that handed it out, the shard its actor renews it
on and the shard its actor writes to, and no shard's loss takes the others'
indices with it.
"""

import threading
import time
from typing import Dict, List, Sequence, Union

from absl import logging
import numpy as np
import reverb

from common import table_names
from common.errors import UserError
from common.tables import _QueueTaker
from common.tables import insert_int64
from common.tables import take_int64s

# Free indices in the server's queue at a time: enough for a few actors that
# start together, few enough that one freed below them is soon at the front.
QUEUE_DEPTH = 8
# How long a claim waits for every answering shard to have queued indices
# (a shard queues them `--actor_lease_grace_s` after it starts).
_SHARDS_SETTLE_S = 20.0


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


def shard_of(index: int, num_shards: int) -> int:
  """The shard that hands out `index`, holds its lease and gets its data."""
  return index % num_shards


def _free_counts(addresses: Sequence[str]) -> List:
  """Per shard: the indices in its queue, or None where it does not answer."""
  counts = []
  for address in addresses:
    try:
      info = reverb.Client(address).server_info(timeout=3)
    except Exception:  # pylint: disable=broad-except
      counts.append(None)
      continue
    table = info.get(table_names.ACTOR_ID_TABLE)
    if table is None:
      raise UserError(f'--task=auto: the server at {address} has no '
                      f'{table_names.ACTOR_ID_TABLE!r} table (not started '
                      'with python -m replay_server?); give --task=<index>')
    counts.append(table.current_size)
  return counts


def claim_actor_id(addresses: Union[str, Sequence[str]],
                   timeout_s: float = 300.0,
                   should_stop=lambda: False) -> int:
  """Takes a free actor index from a replay shard's queue.

  `addresses`: one server, or every shard in --replay_address order. The
  claim goes to the answering shard with the most free indices (the lower
  shard on a tie); a shard that does not answer is skipped. Waits (logging)
  at most `timeout_s`: a server hands out indices a grace period after it
  starts, and may be restarting.
  """
  if isinstance(addresses, str):
    addresses = (addresses,)
  addresses = tuple(addresses)
  # Reverb's Python sampler takes exactly one item from the queue, but it
  # has no timeout: it runs in a thread this call stops waiting for. (If it
  # is still blocked then and gets an index later, that index is never
  # renewed, and its lease expires: never handed out twice.)
  start = time.monotonic()
  taker, source = None, None

  def checked(index: int) -> int:
    # A server started without the whole --replay_address list hands out
    # every index: two actors would share one (its shard and its seeds).
    if len(addresses) > 1 and shard_of(index, len(addresses)) != source:
      raise UserError(
          f'--task=auto: shard {source} ({addresses[source]}) handed out '
          f'index {index}, which belongs to shard '
          f'{shard_of(index, len(addresses))}: start every replay server with '
          'the whole --replay_address list (and --replay_shard=<its position> '
          'where it cannot tell)')
    return index

  while True:
    if taker is not None and taker.result:
      return checked(taker.result[0])
    counts = _free_counts(addresses)
    answering = [k for k, n in enumerate(counts) if n is not None]
    if taker is not None and not taker.is_alive():
      logging.warning('actor: taking an index from %s failed (%s); trying '
                      'again', addresses[source], taker.error)
      taker = None
      time.sleep(1.0)
    elif taker is not None and counts[source] is None:
      logging.warning('actor: %s stopped answering while handing out an '
                      'index; asking another shard', addresses[source])
      taker = None
    # A shard that has not queued its indices yet (its start-up grace) would
    # leave every actor to the others: wait a little for it.
    settling = (any(counts[k] == 0 for k in answering) and
                time.monotonic() - start < _SHARDS_SETTLE_S)
    if taker is None and answering and not settling:
      # max() keeps the first of equal counts: the lower shard.
      source = max(answering, key=lambda k: counts[k])
      taker = _QueueTaker(addresses[source], table_names.ACTOR_ID_TABLE)
    elapsed = time.monotonic() - start
    wait = max(0.0, min(5.0, timeout_s - elapsed))
    if taker is not None:
      taker.join(wait)
      if taker.result:
        return checked(taker.result[0])
    else:
      time.sleep(min(1.0, wait))
    elapsed = time.monotonic() - start
    where = ', '.join(addresses)
    if elapsed >= timeout_s:
      raise UserError(
          f'--task=auto: no free actor index from {where} within '
          f'{timeout_s:g}s (all {table_names.MAX_ACTOR_IDS} taken, or no '
          'server is handing them out); give --task=<index> or raise '
          '--server_timeout_s')
    if should_stop():
      raise UserError(f'stopped while waiting for an actor index from '
                      f'{where}')
    if answering:
      logging.info('actor: waiting for a free actor index from %s (%.0fs of '
                   '%gs)', where, elapsed, timeout_s)
    else:
      logging.info('actor: waiting for Reverb server at %s (%.0fs of %gs), '
                   'for a free actor index', where, elapsed, timeout_s)


class ActorLease:
  """Renews this actor's index on the replay server every few seconds.

  A background thread; failures (the server away) are retried quietly. The
  server hands an index out again when its renewals stop for its
  --actor_lease_timeout_s, and keeps indices renewed here out of what it
  hands out after a restart (see `ActorIndices`).
  """

  def __init__(self, address: str, index: int,
               interval_s: float = table_names.ACTOR_LEASE_INTERVAL_S):
    self._address = address
    self._index = index
    self._interval_s = interval_s
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name=f'actor-lease-{index}')

  def start(self) -> 'ActorLease':
    self._thread.start()
    return self

  def stop(self) -> None:
    self._done.set()

  def _run(self) -> None:
    client = None
    while True:
      try:
        if client is None:
          client = reverb.Client(self._address)
          if table_names.ACTOR_LEASE_TABLE not in client.server_info(
              timeout=2):
            return  # A server without leases (older or not ours).
        insert_int64(client, table_names.ACTOR_LEASE_TABLE, self._index)
      except Exception:  # pylint: disable=broad-except
        client = None  # Reconnect next time (a fresh channel, no backoff).
      if self._done.wait(self._interval_s):
        return


class ActorIndices:
  """The server's side of `--task=auto`: hands out indices no live actor holds.

  Shard `shard` of `num_shards` owns the indices i with i mod num_shards ==
  shard. At start it takes over the queue (the indices restored from a
  checkpoint were free; the others were taken and are held until their lease
  expires), then waits `grace_s` while live actors renew their leases
  (without a checkpoint it cannot know which indices they hold: handing out
  index 0 again while actor 0 still runs would give two actors one index and
  one seed). From then on it keeps the `QUEUE_DEPTH` lowest free indices in
  the queue, in order, and hands back an index whose lease has not been
  renewed for `lease_timeout_s`.

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
    restored = [i for i in take_int64s(address, table_names.ACTOR_ID_TABLE,
                                       200, limit=None, max_in_flight=256)
                if i in mine]
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
    renewed = set(take_int64s(self._address, table_names.ACTOR_LEASE_TABLE,
                              100, limit=size, max_in_flight=64)
                  ) if size else set()
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
    wanted = sorted(self._queued + self._free()[:QUEUE_DEPTH])[:QUEUE_DEPTH]
    if self._queued != wanted[:len(self._queued)]:
      # An index below the queued ones came free (its actor is gone): take the
      # queue back, so that the next actor gets the lowest index.
      back = set(take_int64s(self._address, table_names.ACTOR_ID_TABLE, 200,
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
      wanted = sorted(self._queued + self._free()[:QUEUE_DEPTH])[:QUEUE_DEPTH]
    new = wanted[len(self._queued):]
    if self._queued != wanted[:len(self._queued)]:
      new = self._free()[:max(0, QUEUE_DEPTH - len(self._queued))]
    if new:
      _queue_actor_ids(self._address, new)
      self._queued.extend(new)
