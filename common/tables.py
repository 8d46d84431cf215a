"""The Reverb tables (replay and variables), built from flags alone, and serving them.

The table signatures come from the agent that `common.agents` builds for the
environment and hyperparameters, so the server can start before any learner
exists and never reads another process's files.
"""

import datetime
import errno
import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib
from typing import List, Mapping, Optional

from absl import logging
import numpy as np
import reverb
import tensorflow as tf
import tree

from common import agents
from common import config as config_lib
from common import table_names
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
      name=table_names.REPLAY_TABLE,
      max_size=replay.replay_capacity,
      sampler=sampler,
      remover=reverb.selectors.Fifo(),
      rate_limiter=replay_rate_limiter(replay, batch_size),
      max_times_sampled=0,
      signature=signature)


def variable_table(signature) -> reverb.Table:
  return reverb.Table(
      name=table_names.VARIABLE_TABLE,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_size=1,
      max_times_sampled=0,
      signature=signature)


def actor_id_table() -> reverb.Table:
  return reverb.Table.queue(table_names.ACTOR_ID_TABLE,
                            max_size=table_names.MAX_ACTOR_IDS)


def actor_lease_table() -> reverb.Table:
  """Renewals of held actor indices; the server reads each once.

  A FIFO of bounded size: an insert never blocks (the oldest renewal makes
  room), and every item is gone after the server has sampled it.
  """
  return reverb.Table(
      name=table_names.ACTOR_LEASE_TABLE,
      sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(),
      max_size=table_names.MAX_ACTOR_IDS,
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
  return _latest_value_table(table_names.TRAIN_STEP_TABLE)


def max_priority_table() -> reverb.Table:
  """The largest priority the learner has written: one float64 item."""
  return _latest_value_table(table_names.MAX_PRIORITY_TABLE)


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
  from common import contract  # pylint: disable=g-import-not-at-top
  # Always served (even when no contract is published), so that a checkpoint
  # written with a contract restores into the same set of tables.
  tables = [contract.contract_table()]
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


# Reverb's DefaultCheckpointer names a checkpoint after the time it is written
# (absl's RFC 3339 format) and marks it complete with a DONE file.
_CHECKPOINT_NAME = re.compile(
    r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$')
_DONE = 'DONE'


def checkpoint_name_now() -> str:
  """The name Reverb gives a checkpoint written now (with TZ=UTC, see below)."""
  now = datetime.datetime.now(datetime.timezone.utc)
  return now.strftime('%Y-%m-%dT%H:%M:%S.%f') + '+00:00'


def is_complete_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, _DONE))


def _tfrecord_count(path: str) -> Optional[int]:
  """The records of one of Reverb's (ZLIB) TFRecord files; None unless the
  stream and its last record are complete.

  Walks the length headers (8-byte length, 4-byte CRC, data, 4-byte CRC).
  """
  stream = zlib.decompressobj()
  pending, count = b'', 0
  with open(path, 'rb') as f:
    while True:
      block = f.read(1 << 20)
      if not block:
        break
      try:
        pending += stream.decompress(block)
      except zlib.error:
        return None
      position = 0
      while len(pending) - position >= 12:
        end = position + 12 + struct.unpack(
            '<Q', pending[position:position + 8])[0] + 4
        if end > len(pending):
          break
        position, count = end, count + 1
      pending = pending[position:]
  return count if stream.eof and not pending else None


def checkpoint_damage(path: str, num_tables: Optional[int] = None
                     ) -> Optional[str]:
  """What is wrong with the checkpoint at `path`; None if it looks whole.

  Reverb 0.14 writes its files through buffers whose write errors it never
  sees: on a full disk it writes empty files, a DONE marker, reports
  success and deletes the checkpoint before.
  """
  if not is_complete_checkpoint(path):
    return 'no DONE marker'
  names = sorted(n for n in os.listdir(path) if n.endswith('.tfrecord'))
  if 'tables.tfrecord' not in names:
    return 'no tables.tfrecord'
  for name in names:
    if not os.path.getsize(os.path.join(path, name)):
      return f'{name} is empty'
    count = _tfrecord_count(os.path.join(path, name))
    if count is None:
      return f'{name} ends inside a record (a write cut short)'
    if name == 'tables.tfrecord' and (
        count == 0 or (num_tables is not None and count != num_tables)):
      return (f'tables.tfrecord holds {count} table(s)'
              + (f' of {num_tables}' if num_tables is not None else ''))
  return None


def _size_of(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def check_checkpoint_dir(checkpoint_dir: str) -> List[str]:
  """UserError unless `checkpoint_dir` holds only this server's checkpoints.

  After each checkpoint Reverb deletes every entry of the directory but the
  one whose name sorts last: a foreign file, another shard's directory or a
  checkpoint from a clock that was ahead would make it delete each new
  checkpoint as soon as it is written. Returns the partial checkpoints (no
  DONE marker: a write that failed), which Reverb never restores.
  """
  now = checkpoint_name_now()
  partial = []
  for name in sorted(os.listdir(checkpoint_dir)):
    path = os.path.join(checkpoint_dir, name)
    if not (_CHECKPOINT_NAME.match(name) and os.path.isdir(path)):
      kind = ('a directory (each replay shard needs a --checkpoint_dir of its '
              'own, never one inside another)' if os.path.isdir(path)
              else 'a file')
      raise UserError(
          f'--checkpoint_dir={checkpoint_dir} holds {name!r}, {kind}, which is '
          'not one of its checkpoints: Reverb deletes every entry but the one '
          'whose name sorts last, its new checkpoints included; move it away '
          'or use an empty directory')
    if name > now:
      raise UserError(
          f'--checkpoint_dir={checkpoint_dir} holds the checkpoint {name!r}, '
          f'whose name sorts after {now!r}, the name a checkpoint written now '
          'gets (a clock that was ahead, or another time zone): Reverb would '
          'delete every new checkpoint; rename it to that name to keep it, '
          'or move it away')
    if not is_complete_checkpoint(path):
      partial.append(name)
  complete = [n for n in sorted(os.listdir(checkpoint_dir))
              if n not in partial]
  if complete:
    damage = checkpoint_damage(os.path.join(checkpoint_dir, complete[-1]))
    if damage:
      raise UserError(
          f'the checkpoint {complete[-1]!r} in --checkpoint_dir='
          f'{checkpoint_dir} is damaged ({damage}; written on a full disk?) '
          'and would be restored: move it away (the tables then start from '
          'the checkpoint before, or empty)')
  return partial


def start_server(tables: List[reverb.Table], port: int,
                 checkpoint_dir: str = '',
                 contract: Optional[Mapping] = None) -> reverb.Server:
  """Starts serving; with `checkpoint_dir`, first restores its latest checkpoint.

  The restored tables must have the settings of `tables` (the flags') and,
  where the checkpoint holds one, the run `contract`: otherwise the server
  is stopped and a UserError names the difference.
  """
  checkpointer = None
  if checkpoint_dir:
    outputs.ensure_writable_dir(checkpoint_dir, 'checkpoint_dir')
    # Checkpoint names are local times: in a zone with summer time the names
    # of the hour after the clocks go back sort before those of the hour
    # before, and Reverb would delete each new one. UTC names only go back
    # with the clock itself. (absl reads TZ at each checkpoint.)
    os.environ['TZ'] = 'UTC'
    partial = check_checkpoint_dir(checkpoint_dir)
    complete = [n for n in os.listdir(checkpoint_dir) if n not in partial]
    for name in partial:
      logging.warning('checkpoint %s in %s has no DONE marker (a write that '
                      'failed): it is never restored, and the next checkpoint '
                      'deletes it', name, checkpoint_dir)
    if partial and not complete:
      logging.warning('no complete checkpoint in %s: the tables start empty',
                      checkpoint_dir)
    checkpointer = reverb.checkpointers.DefaultCheckpointer(path=checkpoint_dir)
  if not _port_is_free(port):
    raise UserError(f'port {port} is already in use; stop whatever holds it '
                    'or pick another --port')
  # Read before the server takes the tables over.
  wanted = {t.name: t.info for t in tables}
  try:
    server = reverb.Server(tables, port=port, checkpointer=checkpointer)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if checkpoint_dir:
      extra = re.search(r'Trying to load table (\S+) but table was not found',
                        reason)
      if extra:
        raise UserError(
            f'the checkpoint in {checkpoint_dir} holds a table '
            f'{extra.group(1)!r} that these flags do not serve (written with '
            'another --replay or --tables?): restart with the flags it was '
            'written with, or use an empty --checkpoint_dir') from None
      raise UserError(f'cannot restore the checkpoint in {checkpoint_dir} '
                      f'({reason}); was it written for another --env or other '
                      'network flags? use an empty --checkpoint_dir') from None
    raise UserError(f'cannot serve on port {port} ({reason})') from None
  if checkpoint_dir:
    try:
      client = reverb.Client(f'localhost:{server.port}')
      served = client.server_info(timeout=30)
      _check_restored_contract(client, served, contract, checkpoint_dir)
      difference = restored_table_difference(wanted, served)
      if difference:
        name, setting, restored, flags = difference
        flag = _SETTING_FLAGS.get((name, setting))
        raise UserError(
            f'the checkpoint in {checkpoint_dir} has table {name!r} with '
            f'{setting} {restored}, but the flags ask for {flags}'
            f'{f" ({flag})" if flag else ""}: restart with the flags it was '
            'written with, or use an empty or new --checkpoint_dir')
    except BaseException:
      server.stop()
      raise
  return server


# The flags behind a replay table setting, named in the restore error.
_SETTING_FLAGS = {
    (table_names.REPLAY_TABLE, 'max_size'): '--replay_capacity',
    (table_names.REPLAY_TABLE, 'selector (sampler)'):
        '--replay, --priority_exponent',
    (table_names.REPLAY_TABLE, 'rate limiter'):
        '--rate_limiter, --samples_per_insert, --min_size_to_sample',
}


def _check_restored_contract(client: reverb.Client, served,
                             contract: Optional[Mapping],
                             checkpoint_dir: str) -> None:
  """UserError if the checkpoint's run contract differs from `contract`."""
  from common import contract as contract_lib  # pylint: disable=g-import-not-at-top
  info = served.get(contract_lib.CONTRACT_TABLE)
  if contract is None or info is None or not info.current_size:
    return
  restored = contract_lib.read(client, timeout_s=10.0, server_info=served)
  difference = (contract_lib.first_difference(contract, restored)
                if restored is not None else None)
  if difference:
    flag, mine, theirs = difference
    raise UserError(
        f'--{flag}: the checkpoint in {checkpoint_dir} was written with '
        f'--{flag}={contract_lib.flag_value(theirs)}, the flags say '
        f'--{flag}={contract_lib.flag_value(mine)}; restart with the old '
        'flags or use an empty --checkpoint_dir')


def _selector(options) -> str:
  kind = options.WhichOneof('distribution')
  if kind == 'prioritized':
    return (f'prioritized (priority_exponent='
            f'{options.prioritized.priority_exponent:g})')
  return kind or 'none'


def _rate_limiter(info) -> str:
  # MinSize is a ratio limiter with unbounded slack (reverb.rate_limiters).
  if info.min_diff <= -1e300 and info.max_diff >= 1e300:
    return f'MinSize({info.min_size_to_sample})'
  return (f'SampleToInsertRatio(samples_per_insert={info.samples_per_insert:g}'
          f', min_size_to_sample={info.min_size_to_sample}, error_buffer='
          f'{(info.max_diff - info.min_diff) / 2:g})')


def _signature(signature) -> List[str]:
  if signature is None:
    return ['none']
  return [f'{"/".join(str(p) for p in path) or "data"}: '
          f'{spec.dtype.name}{spec.shape.as_list()}'
          for path, spec in tree.flatten_with_path(signature)]


def restored_table_difference(wanted: Mapping[str, object],
                              served: Mapping[str, object]):
  """(table, setting, served value, wanted value) of the first difference.

  Reverb builds a restored table from the checkpoint's settings, not from
  the ones it was given: without this a restart with other flags would
  serve the old table without a word.
  """
  for name in sorted(wanted):
    want, got = wanted[name], served.get(name)
    if got is None:
      continue
    checks = [
        ('selector (sampler)', _selector(got.sampler_options),
         _selector(want.sampler_options)),
        ('remover', _selector(got.remover_options),
         _selector(want.remover_options)),
        ('max_size', str(got.max_size), str(want.max_size)),
        ('max_times_sampled', str(got.max_times_sampled),
         str(want.max_times_sampled)),
        ('rate limiter', _rate_limiter(got.rate_limiter_info),
         _rate_limiter(want.rate_limiter_info)),
    ]
    for setting, restored, flags in checks:
      if restored != flags:
        return name, setting, restored, flags
    got_sig, want_sig = _signature(got.signature), _signature(want.signature)
    if got_sig != want_sig:
      first = next((i for i, (a, b) in enumerate(zip(got_sig, want_sig))
                    if a != b), min(len(got_sig), len(want_sig)))
      return (name, 'signature', _at(got_sig, first, len(got_sig)),
              _at(want_sig, first, len(want_sig)))
  return None


def _at(items: List[str], i: int, n: int) -> str:
  return f'[{items[i]}]' if i < n else f'({n} entries)'


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
  # The lease table's items are read once each, the contract is one item.
  hidden = (table_names.ACTOR_LEASE_TABLE, 'run_contract')
  return ', '.join(f'{name}={info[name].current_size}' for name in sorted(info)
                   if name not in hidden)


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


def _space_shortfall(checkpoint_dir: str) -> Optional[str]:
  """Why a checkpoint would not fit in the free space; None if it would.

  Reverb deletes the last checkpoint even when the new one could not be
  written (see `checkpoint_damage`), so it is not asked to try without room
  for one as large as the last, and some growth.
  """
  complete = [n for n in sorted(os.listdir(checkpoint_dir))
              if is_complete_checkpoint(os.path.join(checkpoint_dir, n))]
  if not complete:
    return None  # Nothing to lose.
  needed = int(_size_of(os.path.join(checkpoint_dir, complete[-1])) * 1.25
               ) + (64 << 10)
  stat = os.statvfs(checkpoint_dir)
  free = stat.f_bavail * stat.f_frsize
  if free >= needed:
    return None
  return (f'{free} bytes free in {checkpoint_dir}, and the last checkpoint '
          f'took {_size_of(os.path.join(checkpoint_dir, complete[-1]))}')


def _listing(directory: str) -> str:
  try:
    return str(sorted(os.listdir(directory)))
  except OSError as e:
    return f'nothing readable ({e.strerror})'


def _publish_contract(client: reverb.Client,
                      contract: Optional[Mapping]) -> None:
  from common import contract as contract_lib  # pylint: disable=g-import-not-at-top
  if contract is None:
    return
  if contract_lib.CONTRACT_TABLE in client.server_info(timeout=10):
    contract_lib.publish(client, contract)


def _reason(e: Exception) -> str:
  return (str(e).splitlines()[0][:160] if str(e) else '') or type(e).__name__


def serve(tables: List[reverb.Table], port: int, should_stop,
          checkpoint_dir: str = '', checkpoint_interval_s: float = 600.0,
          report_interval_s: float = 30.0,
          actor_lease_grace_s: float = 8.0,
          contract: Optional[Mapping] = None, shard: int = 0,
          num_shards: int = 1, actor_lease_timeout_s: float = 30.0) -> None:
  """Serves `tables` on `port` until `should_stop`; checkpoints if asked.

  With `checkpoint_dir`, the tables are restored from its latest checkpoint at
  start (which must match `tables` and `contract`), checkpointed every
  `checkpoint_interval_s` and once more on stop. A failed checkpoint or
  status read is logged and retried at the next interval; it never stops the
  server. `contract` (the run's shared flags) is published for clients to
  check at connect.
  """
  server = start_server(tables, port, checkpoint_dir, contract)
  address = f'localhost:{server.port}'
  client = reverb.Client(address)
  try:
    _publish_contract(client, contract)
  except BaseException:
    server.stop()
    raise
  names = ', '.join(t.name for t in tables)
  logging.info('serving tables [%s] on port %d', names, server.port)
  logging.warning(
      'Reverb serves port %d on every network interface, without '
      'authentication (it has no bind option): firewall the port or keep it '
      'on a private network', server.port)
  if checkpoint_dir:
    logging.info('checkpoints in %s every %gs; restored: %s', checkpoint_dir,
                 checkpoint_interval_s, _sizes(client))
  actor_ids = None
  if any(t.name == table_names.ACTOR_ID_TABLE for t in tables):
    from common import actor_indices  # pylint: disable=g-import-not-at-top
    actor_ids = actor_indices.ActorIndices(
        address, actor_lease_grace_s, shard=shard, num_shards=num_shards,
        lease_timeout_s=actor_lease_timeout_s)
    logging.info('actor indices: handed out in %gs, after live actors have '
                 'renewed theirs', actor_lease_grace_s)
  last_report = last_checkpoint = time.monotonic()

  def checkpoint(why):
    try:
      # Sizes read first: inserts continue while the checkpoint is written,
      # so it holds at least these items (until the table is full).
      sizes = _sizes(client)
      step = published_train_step(client, timeout_s=1.0)
      shortfall = _space_shortfall(checkpoint_dir)
      if shortfall:
        logging.error('checkpoint (%s) not written: %s; keeping the last '
                      'one, still serving, next try in %gs', why, shortfall,
                      checkpoint_interval_s)
        return
      path = client.checkpoint()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('checkpoint (%s) to %s failed: %s; still serving, next '
                    'try in %gs', why, checkpoint_dir, _reason(e),
                    checkpoint_interval_s)
      return
    # Reverb reports success even when its clean-up deleted the checkpoint
    # it just wrote (an entry of the directory sorting after it), or when it
    # wrote empty files on a full disk.
    if not os.path.isdir(path):
      logging.error('checkpoint (%s) missing: Reverb wrote %s, but it is not '
                    'there (%s holds %s); still serving, next try in %gs',
                    why, path, checkpoint_dir, _listing(checkpoint_dir),
                    checkpoint_interval_s)
      return
    damage = checkpoint_damage(path, len(tables))
    if damage:
      # Never to be restored: a restart starts from nothing rather than
      # from a damaged checkpoint.
      shutil.rmtree(path, ignore_errors=True)
      logging.error('checkpoint (%s) failed: Reverb wrote %s damaged (%s; '
                    'disk full?) and deleted the one before; removed it, '
                    'still serving, next try in %gs', why, path, damage,
                    checkpoint_interval_s)
      return
    logging.info('checkpoint (%s) written to %s: %s%s', why, path, sizes,
                 '' if step is None else f'; weights of train_step {step}')

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
