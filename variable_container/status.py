"""Status as data: each role's latest progress, one JSON item per role.

The learner publishes {'train_step', 'train_steps', 'steps_per_s',
'finished'} and the evaluator {'train_step', 'average_return', ...} to a
one-item table on the servers; the launcher's progress line and the
benchmarks read them here, never from log text. The actors' collection rate
is the replay table's own insert count (`inserted_items`).
"""

import threading
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import reverb

from common import table_names
from common.errors import one_line
from variable_container import one_value

LEARNER = 'learner'
EVALUATOR = 'evaluator'
ROLES = (LEARNER, EVALUATOR)


def table_name(role: str) -> str:
  return f'status_{role}'


def status_tables() -> List[reverb.Table]:
  """One latest-value table per role (an insert replaces the one before)."""
  return [one_value.json_table(table_name(role)) for role in ROLES]


def publish(client: reverb.Client, role: str, **fields) -> None:
  """Replaces `role`'s status with `fields` (JSON values) and the time."""
  fields['time'] = time.time()
  one_value.insert_json(client, table_name(role), fields)


def read(client: reverb.Client, role: str, timeout_s: float = 2.0,
         server_info=None) -> Optional[Dict]:
  """`role`'s latest status; None if none was published (or no table), or
  the server went away while it was read."""
  return one_value.published_json(client, table_name(role), server_info,
                                  timeout_s)


def inserted_items(addresses: Sequence[str]) -> Optional[int]:
  """Items ever inserted into the replay table, summed over the shards that
  answer (one per collected transition); None when none answers."""
  total, answered = 0, False
  for address in addresses:
    try:
      info = reverb.Client(address).server_info(timeout=2)
    except Exception:  # pylint: disable=broad-except
      continue
    table = info.get(table_names.REPLAY_TABLE)
    if table is None:
      continue
    answered = True
    total += int(table.rate_limiter_info.insert_stats.completed)
  return total if answered else None


class Publisher:
  """`role`'s status on every server that answers, off the caller's thread.

  Each server has a thread of its own that sends the latest fields: one that
  is away (a send waits for it) holds up neither training nor the others,
  and what it missed is replaced by newer fields.
  """

  def __init__(self, addresses: Sequence[str], role: str):
    self._senders = [_Sender(a, role) for a in dict.fromkeys(addresses)]
    for sender in self._senders:
      sender.start()

  def publish(self, **fields) -> None:
    for sender in self._senders:
      sender.offer(fields)

  def flush(self, timeout_s: float) -> None:
    """Waits up to `timeout_s` until every server that answers has the last."""
    deadline = time.monotonic() + timeout_s
    for sender in self._senders:
      sender.idle.wait(max(0.0, deadline - time.monotonic()))

  def stop(self) -> None:
    for sender in self._senders:
      sender.done.set()


class _Sender(threading.Thread):
  """One server's latest status fields and the thread that sends them."""

  def __init__(self, address: str, role: str):
    super().__init__(daemon=True, name=f'status {address}')
    self._address = address
    self._role = role
    self._lock = threading.Lock()
    self._pending = None
    self._wake = threading.Event()
    self.idle = threading.Event()
    self.idle.set()
    self.done = threading.Event()

  def offer(self, fields: dict) -> None:
    with self._lock:
      self._pending = dict(fields)
      self.idle.clear()
    self._wake.set()

  def run(self) -> None:
    client, failing = None, False
    while not self.done.is_set():
      if not self._wake.wait(1.0):
        continue
      with self._lock:
        fields, self._pending = self._pending, None
        self._wake.clear()
      try:
        client = client or reverb.Client(self._address)
        # Asked first, with a timeout: an insert into a server that is gone
        # waits for it forever, and would hold up the caller's exit.
        info = client.server_info(timeout=2)
        if table_name(self._role) in info:  # Else: a server without status.
          publish(client, self._role, **fields)
        failing = False
      except Exception as e:  # pylint: disable=broad-except
        client = None
        if not failing:  # Once per outage: status is advice, not training.
          logging.info('%s: status not published to %s (%s)', self._role,
                       self._address, one_line(e))
        failing = True
      with self._lock:
        if self._pending is None:
          self.idle.set()
