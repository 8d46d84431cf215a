"""Client for the `variables` table: `push` and `pull_into`, robust to a slow server.

Wraps TF-Agents' `ReverbVariableContainer` (the stock client, so stock
TF-Agents processes interoperate) with waiting, signature checks and retries
of transient gRPC errors.
"""

import time
from typing import Callable, Optional

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.experimental.distributed import reverb_variable_container

from common import agents
from common import config as config_lib
from common import reverb_connection
from common.errors import UserError

TRAIN_STEP_KEY = reverb_variable_container.TRAIN_STEP_KEY

# Errors after which a retry can succeed: the server is restarting or slow.
# Reverb's Python client reports a dropped connection ("Connection reset by
# peer") as a RuntimeError.
_TRANSIENT = (reverb.errors.DeadlineExceededError, tf.errors.UnavailableError,
              reverb.errors.ReverbError, RuntimeError,
              tf.errors.DeadlineExceededError, tf.errors.CancelledError,
              tf.errors.AbortedError,
              # A server killed while confirming an insert: "Error when
              # confirming that all items written to table". A push is
              # idempotent (the table holds one item), so it is retried.
              tf.errors.InternalError, tf.errors.DataLossError)


class VariableContainerClient:
  """Pushes and pulls the nest `{'policy_variables': ..., 'train_step': ...}`."""

  def __init__(self, address: str, variables, timeout_s: float = 300.0,
               who: str = 'client',
               should_stop: Optional[Callable[[], bool]] = None,
               table: str = config_lib.VARIABLE_TABLE):
    self._address = address
    self._table = table
    self._timeout_s = timeout_s
    self._who = who
    self._should_stop = should_stop or (lambda: False)
    info = reverb_connection.wait_for_server(address, timeout_s, who,
                                             self._should_stop)
    reverb_connection.check_table_signature(
        info, table, agents.variable_signature(variables), address,
        hint=' (variables: the policy network flags must match)')
    self._container = reverb_variable_container.ReverbVariableContainer(
        address, table_names=[table])
    self._client = reverb.Client(address)

  def _ensure_reachable(self) -> None:
    """Waits (logging) while the server is away.

    A pull from an unreachable server blocks inside Reverb with no timeout;
    asking first keeps an outage visible and bounded by the wait timeout.
    """
    try:
      self._client.server_info(timeout=5)
    except Exception:  # pylint: disable=broad-except
      logging.warning('%s: Reverb server at %s is unreachable; waiting for it',
                      self._who, self._address)
      reverb_connection.wait_for_server(self._address, self._timeout_s,
                                        self._who, self._should_stop)
      logging.info('%s: Reverb server at %s is back', self._who,
                   self._address)

  def _retry(self, what: str, fn):
    start = time.monotonic()
    delay = 0.5
    while True:
      self._ensure_reachable()
      try:
        return fn()
      except _TRANSIENT as e:
        elapsed = time.monotonic() - start
        if elapsed > self._timeout_s or self._should_stop():
          raise UserError(f'{what} at {self._address} kept failing for '
                          f'{elapsed:.0f}s: '
                          f'{str(e).splitlines()[0][:120]}') from None
        logging.warning('%s: %s at %s failed (%s); retrying in %.1fs',
                        self._who, what, self._address,
                        type(e).__name__, delay)
        time.sleep(delay)
        delay = min(2 * delay, 5.0)

  def push(self, variables) -> None:
    self._retry('push', lambda: self._container.push(variables, self._table))

  def has_variables(self) -> bool:
    info = self._retry('server_info',
                       lambda: self._client.server_info(timeout=10))
    return info[self._table].current_size > 0

  def pull_into(self, variables, wait: bool = True) -> Optional[int]:
    """Assigns the latest pushed values to `variables`; returns their train_step.

    With `wait`, blocks (logging every 10 s) until a learner has pushed once;
    without, returns None when nothing was pushed yet.
    """
    start = time.monotonic()
    last_log = -float('inf')
    while not self.has_variables():
      if not wait or self._should_stop():
        return None
      elapsed = time.monotonic() - start
      if elapsed - last_log >= 10:
        logging.info('%s: waiting for a learner to push weights to %s '
                     '(%.0fs)', self._who, self._address, elapsed)
        last_log = elapsed
      time.sleep(0.5)
    self._retry('pull', lambda: self._container.update(variables,
                                                       self._table))
    return int(variables[TRAIN_STEP_KEY].numpy())

  def latest_train_step(self) -> Optional[int]:
    """The train_step of the latest push, without touching local variables."""
    if not self.has_variables():
      return None
    values = self._retry('pull', lambda: self._container.pull(self._table))
    return int(values[TRAIN_STEP_KEY].numpy())
