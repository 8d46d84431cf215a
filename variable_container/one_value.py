"""One-value tables: a Reverb table that holds only the latest of its items.

The learner's `train_step` (written with every weight push), the largest
priority it has written (`max_priority`), the run contract and each role's
status are all one small item that a new insert replaces. This module owns
their table definition and reading and writing them: numbers as one int64
(or float64) item, JSON documents as UTF-8 bytes in a uint8 array.

Reads never block for longer than asked: Reverb's Python sampler has no
timeout, and a table emptied by a server restart would block it for good, so
it runs in a thread the caller stops waiting for.
"""

import json
import threading
from typing import Any, Callable, List, Mapping, Optional

import numpy as np
import reverb
import tensorflow as tf

from common import table_names
from common.errors import one_line

# A JSON document's signature: its UTF-8 bytes.
JSON_SIGNATURE = tf.TensorSpec([None], tf.uint8)


def latest_value_table(name: str, signature=None) -> reverb.Table:
  """A table that holds only its latest item (an insert replaces the one
  before); sampling never removes it."""
  return reverb.Table(
      name=name,
      sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(),
      max_size=1,
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_times_sampled=0,
      signature=signature)


def json_table(name: str) -> reverb.Table:
  """A latest-value table of one JSON document."""
  return latest_value_table(name, JSON_SIGNATURE)


def train_step_table() -> reverb.Table:
  """The train_step of the latest weight push: one int64, read for pennies."""
  return latest_value_table(table_names.TRAIN_STEP_TABLE)


def max_priority_table() -> reverb.Table:
  """The largest priority the learner has written: one float64 item."""
  return latest_value_table(table_names.MAX_PRIORITY_TABLE)


class OneItemTaker(threading.Thread):
  """Samples one item of `table` in the background: its first number,
  `convert`ed, lands in `result`; a failure's one line in `error`.

  Started at once; the caller joins it for as long as it is willing to wait.
  With `client` None, connects to `address` (in the thread: connecting can
  block too).
  """

  def __init__(self, address: Optional[str], table: str,
               client: Optional[reverb.Client] = None,
               convert: Callable[[Any], Any] = int):
    super().__init__(daemon=True)
    self._address, self._table, self._client = address, table, client
    self._convert = convert
    self.result, self.error = [], None
    self.start()

  def run(self):
    try:
      client = self._client or reverb.Client(self._address)
      sample = next(client.sample(self._table, num_samples=1))
      self.result.append(self._convert(sample[0].data[0]))
    except Exception as e:  # pylint: disable=broad-except
      self.error = one_line(e)


def insert_int64(client: reverb.Client, table: str, value: int) -> None:
  client.insert(np.int64(value), priorities={table: 1.0})


def read_int64(client: reverb.Client, table: str, timeout_s: float = 5.0,
               convert=int):
  """One one-number item of `table` (e.g. `train_step`), `convert`ed, or
  None after `timeout_s`.

  Reverb's Python sampler (cheap: well under a millisecond here) in a
  thread, so that a table emptied by a server restart cannot block us.
  """
  taker = OneItemTaker(None, table, client, convert)
  taker.join(timeout_s)
  return taker.result[0] if taker.result else None


def published_value(client: reverb.Client, table: str, server_info=None,
                    timeout_s: float = 5.0, convert=int):
  """The value in a one-item table; None if it has none (or no such table).

  `server_info`: the server's answer, if the caller already asked.
  """
  if server_info is None:
    server_info = client.server_info(timeout=10)
  info = server_info.get(table)
  if info is None or not info.current_size:
    return None
  return read_int64(client, table, timeout_s, convert)


def published_train_step(client: reverb.Client, server_info=None,
                         timeout_s: float = 5.0) -> Optional[int]:
  """The step in the `train_step` table; None if it has none (or no table)."""
  return published_value(client, table_names.TRAIN_STEP_TABLE, server_info,
                         timeout_s)


def read_max_priority(client: reverb.Client,
                      timeout_s: float = 2.0) -> Optional[float]:
  """The learner's max priority; None before its first update (or no table)."""
  return published_value(client, table_names.MAX_PRIORITY_TABLE,
                         timeout_s=timeout_s, convert=float)


def take_int64s(address: str, table: str, timeout_ms: int,
                limit: Optional[int] = 1,
                max_in_flight: int = 1) -> List[int]:
  """Samples up to `limit` one-int64 items, waiting at most `timeout_ms`.

  Returns fewer (or none) when nothing more came within the timeout. Unlike
  `reverb.Client.sample`, never blocks for longer than that.
  """
  # A worker may take a few items beyond `limit`: for queues whose items
  # must not be lost, see `actor.actor_index.claim_actor_id`.
  dataset = reverb.TrajectoryDataset(
      address, table, dtypes=tf.int64, shapes=tf.TensorShape([1]),
      max_in_flight_samples_per_worker=max_in_flight,
      num_workers_per_iterator=1,
      rate_limiter_timeout_ms=timeout_ms)
  if limit is not None:
    dataset = dataset.take(limit)
  return [int(sample.data[0]) for sample in dataset]


def _encode_json(document: Mapping) -> np.ndarray:
  data = json.dumps(dict(document), sort_keys=True).encode('utf-8')
  return np.frombuffer(data, dtype=np.uint8)


def _decode_json(array) -> dict:
  return json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode('utf-8'))


def insert_json(client: reverb.Client, table: str, document: Mapping) -> None:
  """Replaces the document in `table` (keys sorted, so equal documents are
  equal bytes)."""
  client.insert(_encode_json(document), priorities={table: 1.0})


def read_json(client: reverb.Client, table: str,
              timeout_s: float = 5.0) -> Optional[dict]:
  """The document in `table`, or None if none came within `timeout_s`
  (sampled even when the table looks empty: one may be inserted meanwhile)."""
  return read_int64(client, table, timeout_s, convert=_decode_json)


def published_json(client: reverb.Client, table: str, server_info=None,
                   timeout_s: float = 5.0) -> Optional[dict]:
  """The document in `table`; None at once if it holds none (or no table)."""
  return published_value(client, table, server_info, timeout_s,
                         convert=_decode_json)
