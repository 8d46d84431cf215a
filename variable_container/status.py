"""Status as data: each role's latest progress, one JSON item per role.

The learner publishes {'train_step', 'train_steps', 'steps_per_s',
'finished'} and the evaluator {'train_step', 'average_return', ...} to a
one-item table on the servers; the launcher's progress line and the
benchmarks read them here, never from log text. The actors' collection rate
is the replay table's own insert count (`inserted_items`).
"""

import time
from typing import Dict, List, Optional, Sequence

import reverb

from common import table_names
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
