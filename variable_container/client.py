"""Client for the `variables` table: `push` and `pull_into`, robust to a slow server.

Wraps TF-Agents' `ReverbVariableContainer` (the stock client, so stock
TF-Agents processes interoperate) with waiting, signature checks and retries
of transient gRPC errors.
"""

import queue
import threading
import time
from typing import Callable, List, Optional, Sequence

from absl import logging
import numpy as np
import reverb
import tensorflow as tf
from tf_agents.experimental.distributed import reverb_variable_container

from common import agents
from common import reverb_connection
from common import table_names
from common.errors import UserError
from common.errors import one_line
from variable_container import one_value

TRAIN_STEP_KEY = reverb_variable_container.TRAIN_STEP_KEY


def non_finite(variables) -> List[str]:
  """Names of the variables in `variables` holding NaN or infinity."""
  return [v.name for v in tf.nest.flatten(variables)
          if v.dtype.is_floating and not np.all(np.isfinite(v.numpy()))]


def refuse_non_finite(variables) -> int:
  """The train_step of `variables`; raises UserError if any is NaN or inf."""
  step = int(variables[TRAIN_STEP_KEY].numpy())
  bad = non_finite(variables)
  if bad:
    raise UserError(
        f'weights became non-finite at train_step {step} ({len(bad)} '
        f'variables, e.g. {bad[0]}); not pushed: lower the learning rates '
        'or the reward scale')
  return step


class VariableContainerClient:
  """Pushes and pulls the nest `{'policy_variables': ..., 'train_step': ...}`."""

  def __init__(self, address: str, variables, timeout_s: float = 300.0,
               who: str = 'client',
               should_stop: Optional[Callable[[], bool]] = None,
               table: str = table_names.VARIABLE_TABLE):
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
    self._container = self._new_container()
    self._client = reverb.Client(address)
    self._has_step_table = (table == table_names.VARIABLE_TABLE and
                            table_names.TRAIN_STEP_TABLE in info)

  def _new_container(self) -> reverb_variable_container.ReverbVariableContainer:
    return reverb_variable_container.ReverbVariableContainer(
        self._address, table_names=[self._table])

  @property
  def address(self) -> str:
    """The server this client talks to."""
    return self._address

  @property
  def has_step_table(self) -> bool:
    """Whether pushes also write the one-int64 `train_step` table."""
    return self._has_step_table

  @property
  def container(self) -> reverb_variable_container.ReverbVariableContainer:
    """The TF-Agents container that pushes and pulls (tests replace its
    `push` to simulate failures)."""
    return self._container

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
    delay, rebuilt = 0.5, 0
    while True:
      self._ensure_reachable()
      try:
        return fn()
      except tf.errors.NotFoundError as e:
        rebuilt += 1
        if 'ReverbClient' not in str(e) or rebuilt > 3:
          raise
        # The TF resource behind the container's Reverb client is gone
        # (seen with an actor and a learner in one process, on a loaded
        # machine): a new client gets a new one.
        logging.warning('%s: the Reverb client of this process for %s is '
                        'gone; %s again over a new one', self._who,
                        self._address, what)
        self._container = self._new_container()
      except Exception as e:  # pylint: disable=broad-except
        if not reverb_connection.is_transient(e):
          raise  # A bug, not an outage: fail at once, with its traceback.
        elapsed = time.monotonic() - start
        if elapsed > self._timeout_s or self._should_stop():
          raise UserError(f'{what} at {self._address} kept failing for '
                          f'{elapsed:.0f}s: '
                          f'{one_line(e, 120)}') from None
        logging.warning('%s: %s at %s failed (%s); retrying in %.1fs',
                        self._who, what, self._address,
                        type(e).__name__, delay)
        time.sleep(delay)
        delay = min(2 * delay, 5.0)

  def push(self, variables) -> None:
    """Publishes `variables` and their train_step; never non-finite ones."""
    step = refuse_non_finite(variables)
    self._retry('push', lambda: self._container.push(variables, self._table))
    if self._has_step_table:
      self._retry('push train_step', lambda: one_value.insert_int64(
          self._client, table_names.TRAIN_STEP_TABLE, step))

  def flush(self, timeout_s: float = 0.0) -> None:
    """Pushes are done when `push` returns; nothing to wait for."""

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
    """The train_step of the latest push, without touching local variables.

    Reads the one-integer `train_step` table: one status call and one tiny
    sample, a few KB (`python -m bench.step_check`). Only for a server
    without that table, or weights pushed by a stock TF-Agents client that
    does not write it, it pulls the weights.
    """
    try:
      info = self._client.server_info(timeout=5)
    except Exception:  # pylint: disable=broad-except
      info = self._retry('server_info',
                         lambda: self._client.server_info(timeout=10))
    step = one_value.published_train_step(self._client, info)
    if step is not None:
      return step
    if not info[self._table].current_size:
      return None
    values = self._retry('pull', lambda: self._container.pull(self._table))
    return int(values[TRAIN_STEP_KEY].numpy())


class ShardedVariablePusher:
  """Pushes the weights and train_step to the `variables` table of every shard.

  With replay shards and no --variable_address every shard serves the
  variables, so that no one shard is needed by all (each actor reads its own
  shard). The learner must go on training while a shard is down: each shard
  has a thread of its own that pushes the latest snapshot handed to it
  (older ones are replaced, never queued) and skips a shard that does not
  answer a short status call, logging once when it stops answering and once
  when it answers again; a shard restarted empty gets the next push.
  """

  def __init__(self, addresses: Sequence[str], variables,
               timeout_s: float = 300.0, who: str = 'learner',
               should_stop: Optional[Callable[[], bool]] = None,
               table: str = table_names.VARIABLE_TABLE):
    # Waits for each shard and checks its table's signature, as one client
    # does; at start every shard must be up.
    self._clients = [VariableContainerClient(a, variables, timeout_s, who,
                                             should_stop, table)
                     for a in addresses]
    self._shards = [_ShardPusher(c, a, who, table)
                    for c, a in zip(self._clients, addresses)]
    for shard in self._shards:
      shard.start()

  def push(self, variables) -> None:
    """Hands a snapshot of `variables` to every shard; never waits on one.

    Raises:
      UserError: a variable is NaN or inf (nothing is pushed).
    """
    step = refuse_non_finite(variables)
    # A copy: training goes on changing the variables while threads push.
    snapshot = tf.nest.map_structure(lambda v: v.numpy(), variables)
    for shard in self._shards:
      shard.offer(snapshot, step)

  def flush(self, timeout_s: float = 10.0) -> None:
    """Waits up to `timeout_s` for the latest push to reach every live shard."""
    deadline = time.monotonic() + timeout_s
    for shard in self._shards:
      shard.wait_idle(max(0.0, deadline - time.monotonic()))

  def latest_train_step(self) -> Optional[int]:
    """The largest train_step any answering shard holds (None: none has one)."""
    steps = []
    for client, shard in zip(self._clients, self._shards):
      if not shard.answers():
        continue  # Down: no wait on it (its client would wait for it).
      try:
        steps.append(client.latest_train_step())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('learner: cannot read train_step at %s (%s)',
                        client.address, type(e).__name__)
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None

  def stop(self) -> None:
    for shard in self._shards:
      shard.done.set()


# A push to one shard that takes longer is given up (the shard was killed
# during it) and tried again.
PUSH_TIMEOUT_S = 15.0


class _ShardPusher(threading.Thread):
  """One shard's latest snapshot and the thread that pushes it."""

  def __init__(self, client: VariableContainerClient, address: str, who: str,
               table: str):
    super().__init__(daemon=True, name=f'variable-pusher {address}')
    self._address = address
    self._who = who
    self._table = table
    self._connect()
    self._has_step_table = client.has_step_table
    self._latest = queue.Queue(maxsize=1)
    self._idle = threading.Event()
    self._idle.set()
    self._up = True
    self.pushed_step: Optional[int] = None
    self.done = threading.Event()

  def _connect(self) -> None:
    self._container = reverb_variable_container.ReverbVariableContainer(
        self._address, table_names=[self._table])
    self._reverb = reverb.Client(self._address)

  def _push(self, snapshot, step: int) -> None:
    self._container.push(snapshot, self._table)
    if self._has_step_table:
      one_value.insert_int64(self._reverb, table_names.TRAIN_STEP_TABLE, step)

  def _push_within(self, snapshot, step: int) -> None:
    """Pushes on a thread of its own, waiting at most PUSH_TIMEOUT_S.

    An insert under way when the shard is killed can wait forever on the
    dead stream (nothing times it out); it is left behind, and the next
    try goes over a new connection, to the shard once it is back.
    """
    outcome = []

    def push():
      try:
        self._push(snapshot, step)
        outcome.append(None)
      except Exception as e:  # pylint: disable=broad-except
        outcome.append(e)

    thread = threading.Thread(target=push, daemon=True,
                              name=f'push {self._address}')
    thread.start()
    thread.join(PUSH_TIMEOUT_S)
    if not outcome:
      logging.warning('%s: a push to %s did not return in %gs; trying again '
                      'over a new connection', self._who, self._address,
                      PUSH_TIMEOUT_S)
      self._connect()
      raise TimeoutError(f'push to {self._address} timed out')
    if outcome[0] is not None:
      raise outcome[0]

  def offer(self, snapshot, step: int) -> None:
    self._idle.clear()
    try:
      self._latest.get_nowait()  # Replaced by the newer one.
    except queue.Empty:
      pass
    self._latest.put_nowait((snapshot, step))

  def wait_idle(self, timeout_s: float) -> bool:
    return self._idle.wait(timeout_s)

  def answers(self) -> bool:
    try:
      self._reverb.server_info(timeout=2)
      up = True
    except Exception:  # pylint: disable=broad-except
      up = False
    if up != self._up:
      if up:
        logging.info('%s: replay shard %s answers again; pushing the latest '
                     'weights to it', self._who, self._address)
      else:
        logging.warning('%s: replay shard %s not answering; weights go to the '
                        'other shards until it is back', self._who,
                        self._address)
      self._up = up
    return up

  def run(self) -> None:
    pending = None
    while not self.done.is_set():
      try:
        pending = self._latest.get(timeout=1.0)
      except queue.Empty:
        if pending is None:
          self._idle.set()
          continue
      if not self.answers():
        # Skipped while down: its idle state would hold up `flush`.
        self._idle.set()
        continue
      snapshot, step = pending
      try:
        self._push_within(snapshot, step)
        self.pushed_step, pending = step, None
        if self._latest.empty():
          self._idle.set()
      except Exception as e:  # pylint: disable=broad-except
        if not reverb_connection.is_transient(e):
          logging.error('%s: push to %s failed: %s', self._who,
                        self._address, one_line(e, 200))
          pending = None
        # Transient: kept, and tried again once the shard answers.
