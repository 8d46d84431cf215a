"""`--task=auto` actor indices: the server's queue of free indices and the
actors' claims and lease renewals.
"""

import threading
import time

from absl import logging
import numpy as np
import reverb

from common import config as config_lib
from common.errors import UserError
from common.tables import _QueueTaker
from common.tables import insert_int64
from common.tables import take_int64s


def fill_actor_ids(address: str) -> int:
  """Queues the indices 0, 1, ... for `--task=auto` actors (a server without
  leases, e.g. in tests; `serve` uses `ActorIndices`).

  Does nothing if the queue is not empty (restored from a checkpoint).
  Returns the number of indices queued.
  """
  return _queue_actor_ids(address, range(config_lib.MAX_ACTOR_IDS),
                          only_if_empty=True)


def _queue_actor_ids(address: str, indices, only_if_empty: bool = False) -> int:
  client = reverb.Client(address)
  if (only_if_empty and
      client.server_info()[config_lib.ACTOR_ID_TABLE].current_size):
    return 0  # Restored from a checkpoint: keep the indices not yet taken.
  with client.writer(max_sequence_length=1) as writer:
    for index in indices:
      writer.append(np.int64(index))
      writer.create_item(config_lib.ACTOR_ID_TABLE, num_timesteps=1,
                         priority=1.0)
  return len(indices)


def claim_actor_id(address: str, timeout_s: float = 300.0,
                   should_stop=lambda: False) -> int:
  """Takes the next free actor index from the replay server's queue.

  Waits (logging) at most `timeout_s`: a server hands out indices a grace
  period after it starts, and may be restarting.
  """
  client = reverb.Client(address)
  if config_lib.ACTOR_ID_TABLE not in client.server_info(timeout=10):
    raise UserError(f'--task=auto: the server at {address} has no '
                    f'{config_lib.ACTOR_ID_TABLE!r} table (not started with '
                    'python -m replay_server?); give --task=<index>')
  # Reverb's Python sampler takes exactly one item from the queue, but it
  # has no timeout: it runs in a thread this call stops waiting for. (If it
  # is still blocked then and gets an index later, that index is unused,
  # never handed out twice.)
  start = time.monotonic()
  taker = None
  while True:
    if taker is None or not taker.is_alive():
      if taker is not None and taker.result:
        return taker.result[0]
      if taker is not None:
        logging.warning('actor: taking an index from %s failed (%s); trying '
                        'again', address, taker.error)
        time.sleep(1.0)
      taker = _QueueTaker(address, config_lib.ACTOR_ID_TABLE)
    elapsed = time.monotonic() - start
    taker.join(max(0.0, min(5.0, timeout_s - elapsed)))
    if taker.result:
      return taker.result[0]
    elapsed = time.monotonic() - start
    if elapsed >= timeout_s:
      raise UserError(
          f'--task=auto: no free actor index from {address} within '
          f'{timeout_s:g}s (all {config_lib.MAX_ACTOR_IDS} taken, or the '
          'server is not handing them out); give --task=<index> or raise '
          '--server_timeout_s')
    if should_stop():
      raise UserError(f'stopped while waiting for an actor index from '
                      f'{address}')
    if taker.is_alive():
      logging.info('actor: waiting for a free actor index from %s (%.0fs of '
                   '%gs)', address, elapsed, timeout_s)


class ActorLease:
  """Renews this actor's index on the replay server every few seconds.

  A background thread; failures (the server away) are retried quietly. The
  server keeps indices renewed here out of what it hands out after a restart
  (see `ActorIndices`).
  """

  def __init__(self, address: str, index: int,
               interval_s: float = config_lib.ACTOR_LEASE_INTERVAL_S):
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
          if config_lib.ACTOR_LEASE_TABLE not in client.server_info(
              timeout=2):
            return  # A server without leases (older or not ours).
        insert_int64(client, config_lib.ACTOR_LEASE_TABLE, self._index)
      except Exception:  # pylint: disable=broad-except
        client = None  # Reconnect next time (a fresh channel, no backoff).
      if self._done.wait(self._interval_s):
        return


class ActorIndices:
  """The server's side of `--task=auto`: hands out indices no live actor holds.

  At start it takes over the queue (the indices restored from a checkpoint,
  or all of them), then waits `grace_s` while live actors renew their
  leases, then queues every index that none of them holds. Without this a
  server restarted without a checkpoint would hand out index 0 again while
  actor 0 still runs (same index, same environment seeds).
  """

  def __init__(self, address: str, grace_s: float):
    self._address = address
    self._client = reverb.Client(address)
    restored = take_int64s(address, config_lib.ACTOR_ID_TABLE, 200,
                           limit=None, max_in_flight=256)
    self._free = set(restored) if restored else set(
        range(config_lib.MAX_ACTOR_IDS))
    self.held = set()
    self._ready_at = time.monotonic() + grace_s
    self.queued = False
    self._restored = bool(restored)

  def poll(self) -> None:
    """Reads lease renewals; queues the free indices once the grace is over."""
    size = self._client.server_info(
        timeout=5)[config_lib.ACTOR_LEASE_TABLE].current_size
    renewed = set(take_int64s(self._address, config_lib.ACTOR_LEASE_TABLE,
                              100, limit=size, max_in_flight=64)
                  ) if size else set()
    self.held |= renewed
    if not self.queued and time.monotonic() >= self._ready_at:
      free = sorted(self._free - self.held)
      _queue_actor_ids(self._address, free)
      self.queued = True
      logging.info('actor indices: %d free from %d on%s; held by live actors: '
                   '%s', len(free), free[0] if free else -1,
                   ' (restored)' if self._restored else '',
                   sorted(self.held) or 'none')
