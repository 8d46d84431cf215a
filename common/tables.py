"""The Reverb tables (replay and variables), built from flags alone, and serving them.

The table signatures come from the agent that `common.agents` builds for the
environment and hyperparameters, so the server can start before any learner
exists and never reads another process's files.
"""

import errno
import socket
import threading
import time
from typing import List, Optional

from absl import logging
import numpy as np
import reverb
import tensorflow as tf

from common import agents
from common import config as config_lib
from common import environments
from common import outputs
from common.errors import UserError


def replay_rate_limiter(replay: config_lib.ReplayConfig, batch_size: int):
  if replay.samples_per_insert is None:
    return reverb.rate_limiters.MinSize(replay.min_size_to_sample)
  spi = replay.samples_per_insert
  # Enough slack for a few whole batches to be in flight either way, or the
  # learner and the actors would wait on each other item by item.
  error_buffer = max(
      replay.min_size_to_sample * spi * replay.samples_per_insert_tolerance,
      4.0 * max(spi, batch_size))
  return reverb.rate_limiters.SampleToInsertRatio(
      samples_per_insert=spi,
      min_size_to_sample=replay.min_size_to_sample,
      error_buffer=error_buffer)


def replay_table(signature, replay: config_lib.ReplayConfig,
                 batch_size: int) -> reverb.Table:
  """`uniform_table` (its name kept for stock clients, also when prioritized)."""
  sampler = (reverb.selectors.Prioritized(replay.priority_exponent)
             if replay.prioritized else reverb.selectors.Uniform())
  return reverb.Table(
      name=config_lib.REPLAY_TABLE,
      max_size=replay.replay_capacity,
      sampler=sampler,
      remover=reverb.selectors.Fifo(),
      rate_limiter=replay_rate_limiter(replay, batch_size),
      max_times_sampled=0,
      signature=signature)


def variable_table(signature) -> reverb.Table:
  return reverb.Table(
      name=config_lib.VARIABLE_TABLE,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_size=1,
      max_times_sampled=0,
      signature=signature)


def actor_id_table() -> reverb.Table:
  return reverb.Table.queue(config_lib.ACTOR_ID_TABLE,
                            max_size=config_lib.MAX_ACTOR_IDS)


def actor_lease_table() -> reverb.Table:
  """Renewals of held actor indices; the server reads each once.

  A FIFO of bounded size: an insert never blocks (the oldest renewal makes
  room), and every item is gone after the server has sampled it.
  """
  return reverb.Table(
      name=config_lib.ACTOR_LEASE_TABLE,
      sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(),
      max_size=config_lib.MAX_ACTOR_IDS,
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_times_sampled=1)


def _latest_value_table(name: str) -> reverb.Table:
  """A table that holds only the latest of one-number items."""
  return reverb.Table(
      name=name,
      sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(),
      max_size=1,
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_times_sampled=0)


def train_step_table() -> reverb.Table:
  """The train_step of the latest weight push: one int64, read for pennies."""
  return _latest_value_table(config_lib.TRAIN_STEP_TABLE)


def max_priority_table() -> reverb.Table:
  """The largest priority the learner has written: one float64 item."""
  return _latest_value_table(config_lib.MAX_PRIORITY_TABLE)


def read_max_priority(client: reverb.Client,
                      timeout_s: float = 2.0) -> Optional[float]:
  """The learner's max priority; None before its first update (or no table)."""
  return published_value(client, config_lib.MAX_PRIORITY_TABLE,
                         timeout_s=timeout_s, convert=float)


def take_int64s(address: str, table: str, timeout_ms: int,
                limit: Optional[int] = 1,
                max_in_flight: int = 1) -> List[int]:
  """Samples up to `limit` one-int64 items, waiting at most `timeout_ms`.

  Returns fewer (or none) when nothing more came within the timeout. Unlike
  `reverb.Client.sample`, never blocks for longer than that.
  """
  # A worker may take a few items beyond `limit`: for queues whose items
  # must not be lost, see `claim_actor_id`.
  dataset = reverb.TrajectoryDataset(
      address, table, dtypes=tf.int64, shapes=tf.TensorShape([1]),
      max_in_flight_samples_per_worker=max_in_flight,
      num_workers_per_iterator=1,
      rate_limiter_timeout_ms=timeout_ms)
  if limit is not None:
    dataset = dataset.take(limit)
  return [int(sample.data[0]) for sample in dataset]


def insert_int64(client: reverb.Client, table: str, value: int) -> None:
  client.insert(np.int64(value), priorities={table: 1.0})


def read_int64(client: reverb.Client, table: str, timeout_s: float = 5.0,
               convert=int):
  """One one-number item of `table` (e.g. `train_step`), `convert`ed, or
  None after `timeout_s`.

  Reverb's Python sampler (cheap: well under a millisecond here) in a
  thread, so that a table emptied by a server restart cannot block us.
  """
  taker = _QueueTaker(None, table, client, convert)
  taker.join(timeout_s)
  return taker.result[0] if taker.result else None


class _QueueTaker(threading.Thread):
  """Samples one one-number item (int64, or `convert`ed) in the background."""

  def __init__(self, address: Optional[str], table: str,
               client: Optional[reverb.Client] = None, convert=int):
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
      self.error = _reason(e)


def build_tables(env_name: str, agent_config: config_lib.AgentConfig,
                 replay: Optional[config_lib.ReplayConfig],
                 with_variables: bool = True,
                 env_options: environments.EnvOptions = (
                     environments.EnvOptions())) -> List[reverb.Table]:
  """The tables for `env_name`; `replay=None` builds the variables table only."""
  env = environments.load_environment(env_name, options=env_options)
  try:
    agent = agents.create_agent(env, agent_config, env_name=env_name)
  finally:
    env.close()
  tables = []
  if replay is not None:
    tables.append(replay_table(agents.replay_signature(agent), replay,
                               agent_config.batch_size))
    tables.append(actor_id_table())
    tables.append(actor_lease_table())
    if replay.prioritized:
      tables.append(max_priority_table())
  if with_variables:
    variables = agents.shared_variables(agent, agent.train_step_counter)
    tables.append(variable_table(agents.variable_signature(variables)))
    tables.append(train_step_table())
  return tables


def start_server(tables: List[reverb.Table], port: int,
                 checkpoint_dir: str = '') -> reverb.Server:
  """Starts serving; with `checkpoint_dir`, first restores its latest checkpoint."""
  checkpointer = None
  if checkpoint_dir:
    outputs.ensure_writable_dir(checkpoint_dir, 'checkpoint_dir')
    checkpointer = reverb.checkpointers.DefaultCheckpointer(path=checkpoint_dir)
  if not _port_is_free(port):
    raise UserError(f'port {port} is already in use; stop whatever holds it '
                    'or pick another --port')
  try:
    return reverb.Server(tables, port=port, checkpointer=checkpointer)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if checkpoint_dir:
      raise UserError(f'cannot restore the checkpoint in {checkpoint_dir} '
                      f'({reason}); was it written for another --env or other '
                      'network flags? use an empty --checkpoint_dir') from None
    raise UserError(f'cannot serve on port {port} ({reason})') from None


def _port_is_free(port: int) -> bool:
  """False if something listens on `port` (as gRPC, ignores TIME_WAIT)."""
  for family, host in ((socket.AF_INET6, '::'), (socket.AF_INET, '0.0.0.0')):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind((host, port))
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          return False
  return True


def _sizes(client: reverb.Client) -> str:
  info = client.server_info(timeout=10)
  return ', '.join(f'{name}={info[name].current_size}' for name in sorted(info)
                   if name != config_lib.ACTOR_LEASE_TABLE)


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
  return published_value(client, config_lib.TRAIN_STEP_TABLE, server_info,
                         timeout_s)


def _reason(e: Exception) -> str:
  return (str(e).splitlines()[0][:160] if str(e) else '') or type(e).__name__


def serve(tables: List[reverb.Table], port: int, should_stop,
          checkpoint_dir: str = '', checkpoint_interval_s: float = 600.0,
          report_interval_s: float = 30.0,
          actor_lease_grace_s: float = 8.0) -> None:
  """Serves `tables` on `port` until `should_stop`; checkpoints if asked.

  With `checkpoint_dir`, the tables are restored from its latest checkpoint at
  start, checkpointed every `checkpoint_interval_s` and once more on stop. A
  failed checkpoint or status read is logged and retried at the next
  interval; it never stops the server.
  """
  server = start_server(tables, port, checkpoint_dir)
  address = f'localhost:{server.port}'
  client = reverb.Client(address)
  names = ', '.join(t.name for t in tables)
  logging.info('serving tables [%s] on port %d', names, server.port)
  if checkpoint_dir:
    logging.info('checkpoints in %s every %gs; restored: %s', checkpoint_dir,
                 checkpoint_interval_s, _sizes(client))
  actor_ids = None
  if any(t.name == config_lib.ACTOR_ID_TABLE for t in tables):
    from common import actor_indices  # pylint: disable=g-import-not-at-top
    actor_ids = actor_indices.ActorIndices(address, actor_lease_grace_s)
    logging.info('actor indices: handed out in %gs, after live actors have '
                 'renewed theirs', actor_lease_grace_s)
  last_report = last_checkpoint = time.monotonic()

  def checkpoint(why):
    try:
      # Sizes read first: inserts continue while the checkpoint is written,
      # so it holds at least these items (until the table is full).
      sizes = _sizes(client)
      step = published_train_step(client, timeout_s=1.0)
      path = client.checkpoint()
      logging.info('checkpoint (%s) written to %s: %s%s', why, path, sizes,
                   '' if step is None else f'; weights of train_step {step}')
    except Exception as e:  # pylint: disable=broad-except
      logging.error('checkpoint (%s) to %s failed: %s; still serving, next '
                    'try in %gs', why, checkpoint_dir, _reason(e),
                    checkpoint_interval_s)

  def guarded(what, fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s failed: %s; still serving, trying again later',
                      what, _reason(e))

  try:
    while not should_stop.wait(1.0):
      now = time.monotonic()
      if actor_ids is not None:
        guarded('reading actor index leases', actor_ids.poll)
      if checkpoint_dir and now - last_checkpoint >= checkpoint_interval_s:
        checkpoint('periodic')
        last_checkpoint = now
      if now - last_report >= report_interval_s:
        guarded('reading table sizes',
                lambda: logging.info('table sizes: %s', _sizes(client)))
        last_report = now
    if checkpoint_dir:
      checkpoint('on stop')
  finally:
    logging.info('stopping server on port %d', server.port)
    server.stop()
