"""Talking to a Reverb server: addresses, waiting for it, checking its
tables, and telling an outage (retry) from a bug (fail).

Clients never assume a server is up: `wait_for_server` polls with backoff and
logs while it waits, and gives up with a one-line `UserError` after the
timeout (`--server_timeout_s`); `is_transient` says which errors a retry can
cure.
"""

import time
from typing import Callable, Optional

from absl import logging
import reverb
import tensorflow as tf

from common.config import parse_address
from common.errors import UserError
from common.errors import one_line

# Errors after which a retry can succeed: the server is restarting or slow.
_TRANSIENT_TYPES = (TimeoutError, tf.errors.UnavailableError,
                    tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                    reverb.errors.DeadlineExceededError)
# Other errors are transient only when they say the connection went away:
# Reverb's Python client reports a dropped connection ("Connection reset by
# peer") as a RuntimeError, and a server killed while confirming an insert as
# InternalError ("Error when confirming that all items written to table").
_CONNECTION_LOST = ('connection reset', 'connection refused', 'socket closed',
                    'failed to connect', 'broken pipe', 'stream removed',
                    'unavailable', 'goaway', 'error when confirming')


def is_transient(error: BaseException) -> bool:
  """True for errors a retry can cure; a genuine bug is never retried."""
  if isinstance(error, _TRANSIENT_TYPES):
    return True
  if isinstance(error, (RuntimeError, tf.errors.OpError,
                        reverb.errors.ReverbError)):
    text = str(error).lower()
    return any(words in text for words in _CONNECTION_LOST)
  return False


def wait_for_server(address: str, timeout_s: float, who: str = 'client',
                    should_stop: Optional[Callable[[], bool]] = None):
  """Blocks until the Reverb server at `address` answers; returns its info.

  Raises:
    UserError: the server did not answer within `timeout_s` seconds.
  """
  parse_address(address)
  start = time.monotonic()
  delay = 0.25
  attempt = 0
  last_log = -float('inf')
  while True:
    attempt += 1
    remaining = timeout_s - (time.monotonic() - start)
    try:
      return reverb.Client(address).server_info(
          timeout=max(1, min(5, int(remaining))))
    except Exception as e:  # pylint: disable=broad-except
      reason = one_line(e, 120)
    elapsed = time.monotonic() - start
    if elapsed >= timeout_s:
      raise UserError(
          f'Reverb server at {address} did not answer within '
          f'{timeout_s:g}s ({reason}); start it (python -m replay_server) or '
          'check the address, or raise --server_timeout_s')
    if should_stop is not None and should_stop():
      raise UserError(f'stopped while waiting for {address}')
    if elapsed - last_log >= 5 or attempt == 1:
      logging.info('%s: waiting for Reverb server at %s (%.0fs of %gs)',
                   who, address, elapsed, timeout_s)
      last_log = elapsed
    time.sleep(min(delay, max(0.0, timeout_s - elapsed)))
    delay = min(delay * 2, 5.0)


def _describe(signature) -> str:
  flat = tf.nest.flatten(signature)
  parts = [f'{s.dtype.name}{list(s.shape)}' for s in flat]
  text = ', '.join(parts)
  return text if len(text) < 300 else text[:300] + '...'


def check_table_signature(server_info, table: str, expected, address: str,
                          hint: str = '') -> None:
  """Raises UserError unless `table` exists with signature `expected`."""
  if table not in server_info:
    raise UserError(f'Reverb server at {address} has no table {table!r} '
                    f'(it has {sorted(server_info)}){hint}')
  offered = server_info[table].signature
  if offered is None:
    return
  expected_flat = [(s.dtype, tuple(s.shape.as_list()))
                   for s in tf.nest.flatten(expected)]
  offered_flat = [(s.dtype, tuple(s.shape.as_list()))
                  for s in tf.nest.flatten(offered)]
  if expected_flat != offered_flat:
    raise UserError(
        f'table {table!r} at {address} expects [{_describe(offered)}] but '
        f'this process offers [{_describe(expected)}]: --env, --agent, '
        f'--n_step and the network flags must match the server\'s{hint}')
