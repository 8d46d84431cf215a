"""Status as data: each role's latest progress, one JSON item per role.

The learner publishes {'train_step', 'train_steps', 'steps_per_s',
'finished'} and the evaluator {'train_step', 'average_return', ...} to a
one-item table on the servers; the launcher's progress line and the
benchmarks read them here, never from log text. The actors' collection rate
is the replay table's own insert count (`inserted_items`).
"""

import json
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import reverb
import tensorflow as tf

from common import table_names

LEARNER = 'learner'
EVALUATOR = 'evaluator'
ROLES = (LEARNER, EVALUATOR)


def table_name(role: str) -> str:
  return f'status_{role}'


def status_tables() -> List[reverb.Table]:
  """One latest-value table per role (an insert replaces the one before)."""
  return [reverb.Table(
      name=table_name(role),
      sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(),
      max_size=1,
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_times_sampled=0,
      signature=tf.TensorSpec([None], tf.uint8)) for role in ROLES]


def publish(client: reverb.Client, role: str, **fields) -> None:
  """Replaces `role`'s status with `fields` (JSON values) and the time."""
  fields['time'] = time.time()
  data = json.dumps(fields, sort_keys=True).encode('utf-8')
  client.insert(np.frombuffer(data, dtype=np.uint8),
                priorities={table_name(role): 1.0})


def read(client: reverb.Client, role: str, timeout_s: float = 2.0,
         server_info=None) -> Optional[Dict]:
  """`role`'s latest status; None if none was published (or no table)."""
  if server_info is None:
    server_info = client.server_info(timeout=10)
  info = server_info.get(table_name(role))
  if info is None or not info.current_size:
    return None
  result = []

  def take():
    try:
      sample = next(client.sample(table_name(role), num_samples=1))
      result.append(json.loads(np.asarray(sample[0].data[0], np.uint8)
                               .tobytes().decode('utf-8')))
    except Exception:  # pylint: disable=broad-except
      pass  # A server going away: no status this time.

  # In a thread: a table emptied by a server restart cannot block the caller.
  thread = threading.Thread(target=take, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return result[0] if result else None


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
