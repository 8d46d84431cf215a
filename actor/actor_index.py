"""`--task=auto` actor indices, the actors' side: claiming a free index and
renewing its lease.

An actor takes the next free index from a replay shard's queue
(`claim_actor_id`) and renews it on that shard every ACTOR_LEASE_INTERVAL_S
(`ActorLease`); the shard hands it out again once the renewals stop. With S
shards, index i belongs to shard `table_names.shard_of(i, S)`: the shard
that handed it out, holds its lease and gets its actor's data. The servers'
side is `replay_server.actor_indices`.
"""

import threading
import time
from typing import Callable, List, Optional, Sequence, Union

from absl import logging
import reverb

from common import table_names
from common.errors import UserError
from variable_container import one_value

# How long a claim waits for every answering shard to have queued indices
# (a shard queues them `--actor_lease_grace_s` after it starts).
_SHARDS_SETTLE_S = 20.0


def _free_counts(addresses: Sequence[str]) -> List:
  """Per shard: (indices in its queue, indices it has handed out), or None
  where it does not answer."""
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
    counts.append((table.current_size,
                   table.rate_limiter_info.sample_stats.completed))
  return counts


class _Claim:
  """One claim in progress: the shard asked and the taker waiting on it.

  Reverb's Python sampler takes exactly one item from the queue, but it has
  no timeout: it runs in a thread (`taker`) this claim stops waiting for. (If
  it is still blocked then and gets an index later, that index is never
  renewed, and its lease expires: never handed out twice.)
  """

  def __init__(self, addresses: Sequence[str], timeout_s: float):
    self.addresses = addresses
    self.timeout_s = timeout_s
    self.start = time.monotonic()
    self.taker = None
    self.source = None

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def taken(self) -> Optional[int]:
    """The index the taker got, checked; None while it has none."""
    if self.taker is not None and self.taker.result:
      return self._checked(self.taker.result[0])
    return None

  def _checked(self, index: int) -> int:
    # A server started without the whole --replay_address list hands out
    # every index: two actors would share one (its shard and its seeds).
    owner = table_names.shard_of(index, len(self.addresses))
    if len(self.addresses) > 1 and owner != self.source:
      raise UserError(
          f'--task=auto: shard {self.source} ({self.addresses[self.source]}) '
          f'handed out index {index}, which belongs to shard {owner}: start '
          'every replay server with the whole --replay_address list (and '
          '--replay_shard=<its position> where it cannot tell)')
    return index

  def drop_lost_taker(self, counts: List) -> None:
    """Forgets a taker that failed, or whose shard stopped answering."""
    if self.taker is not None and not self.taker.is_alive():
      logging.warning('actor: taking an index from %s failed (%s); trying '
                      'again', self.addresses[self.source], self.taker.error)
      self.taker = None
      time.sleep(1.0)
    elif self.taker is not None and counts[self.source] is None:
      logging.warning('actor: %s stopped answering while handing out an '
                      'index; asking another shard',
                      self.addresses[self.source])
      self.taker = None

  def ask(self, counts: List, answering: List[int]) -> None:
    """Starts a taker on the answering shard with the most free indices."""
    # A shard that has not queued its indices yet (its start-up grace) would
    # leave every actor to the others: wait a little for it.
    settling = (any(counts[k][0] == 0 for k in answering) and
                self.elapsed() < _SHARDS_SETTLE_S)
    if self.taker is None and answering and not settling:
      # The most free indices; then the fewest handed out (a shard refills
      # its queue within a second, so the free counts are mostly equal);
      # then the lower shard (max() keeps the first of equals).
      self.source = max(answering,
                        key=lambda k: (counts[k][0], -counts[k][1]))
      self.taker = one_value.OneItemTaker(self.addresses[self.source],
                                          table_names.ACTOR_ID_TABLE)

  def wait(self) -> Optional[int]:
    """Waits a few seconds (at most what is left) for the taker's index."""
    wait = max(0.0, min(5.0, self.timeout_s - self.elapsed()))
    if self.taker is not None:
      self.taker.join(wait)
      return self.taken()
    time.sleep(min(1.0, wait))
    return None


def _give_up_or_log(claim: _Claim, answering: List[int],
                    should_stop: Callable[[], bool]) -> None:
  """Raises past the claim's timeout or once stopped; else logs the wait."""
  elapsed = claim.elapsed()
  where = ', '.join(claim.addresses)
  if elapsed >= claim.timeout_s:
    raise UserError(
        f'--task=auto: no free actor index from {where} within '
        f'{claim.timeout_s:g}s (all {table_names.MAX_ACTOR_IDS} taken, or no '
        'server is handing them out); give --task=<index> or raise '
        '--server_timeout_s')
  if should_stop():
    raise UserError(f'stopped while waiting for an actor index from '
                    f'{where}')
  if answering:
    logging.info('actor: waiting for a free actor index from %s (%.0fs of '
                 '%gs)', where, elapsed, claim.timeout_s)
  else:
    logging.info('actor: waiting for Reverb server at %s (%.0fs of %gs), '
                 'for a free actor index', where, elapsed, claim.timeout_s)


def claim_actor_id(addresses: Union[str, Sequence[str]],
                   timeout_s: float = 300.0,
                   should_stop=lambda: False) -> int:
  """Takes a free actor index from a replay shard's queue.

  `addresses`: one server, or every shard in --replay_address order. The
  claim goes to the answering shard with the most free indices (on a tie,
  the one that handed out fewer, then the lower shard); a shard that does not answer is skipped. Waits (logging)
  at most `timeout_s`: a server hands out indices a grace period after it
  starts, and may be restarting.
  """
  if isinstance(addresses, str):
    addresses = (addresses,)
  claim = _Claim(tuple(addresses), timeout_s)
  while True:
    index = claim.taken()
    if index is not None:
      return index
    counts = _free_counts(claim.addresses)
    answering = [k for k, n in enumerate(counts) if n is not None]
    claim.drop_lost_taker(counts)
    claim.ask(counts, answering)
    index = claim.wait()
    if index is not None:
      return index
    _give_up_or_log(claim, answering, should_stop)


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
        one_value.insert_int64(client, table_names.ACTOR_LEASE_TABLE,
                               self._index)
      except Exception:  # pylint: disable=broad-except
        client = None  # Reconnect next time (a fresh channel, no backoff).
      if self._done.wait(self._interval_s):
        return
