"""The replay server's checkpoints: a directory it owns, writes it reads back,
and restores that match the flags.

Reverb 0.14's checkpointer trusts too much: after each checkpoint it deletes
every entry of the directory but the one whose name sorts last, it reports
success for files it could not write (a full disk), and it restores a table
with the checkpoint's settings rather than the ones it was given. Each check
here closes one of those holes with a one-line `UserError` at start or a
logged, retried failure while serving.
"""

import datetime
import os
import re
import shutil
import struct
import zlib
from typing import List, Mapping, Optional

from absl import logging
import reverb
import tree

from variable_container import contract as contract_lib
from common import outputs
from common import table_names
from common.errors import UserError
from common.errors import one_line
from replay_server import tables as tables_lib
from variable_container import one_value

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


def checkpointer(
    checkpoint_dir: str) -> reverb.checkpointers.CheckpointerBase:
  """Reverb's checkpointer for `checkpoint_dir`, once the directory is
  writable, this server's own and its latest checkpoint whole."""
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
  return reverb.checkpointers.DefaultCheckpointer(path=checkpoint_dir)


def restore_error(reason: str, checkpoint_dir: str) -> UserError:
  """The UserError for a server that could not restore `checkpoint_dir`
  (`reason`: Reverb's one line)."""
  extra = re.search(r'Trying to load table (\S+) but table was not found',
                    reason)
  if extra:
    return UserError(
        f'the checkpoint in {checkpoint_dir} holds a table '
        f'{extra.group(1)!r} that these flags do not serve (written with '
        'another --replay or --tables?): restart with the flags it was '
        'written with, or use an empty --checkpoint_dir')
  return UserError(f'cannot restore the checkpoint in {checkpoint_dir} '
                   f'({reason}); was it written for another --env or other '
                   'network flags? use an empty --checkpoint_dir')


# The flags behind a replay table setting, named in the restore error.
_SETTING_FLAGS = {
    (table_names.REPLAY_TABLE, 'max_size'): '--replay_capacity',
    (table_names.REPLAY_TABLE, 'selector (sampler)'):
        '--replay, --priority_exponent',
    (table_names.REPLAY_TABLE, 'rate limiter'):
        '--rate_limiter, --samples_per_insert, --min_size_to_sample',
}


def check_restored(client: reverb.Client, served, wanted: Mapping[str, object],
                   contract: Optional[Mapping], checkpoint_dir: str) -> None:
  """UserError unless what the server restored from `checkpoint_dir` has the
  run `contract` and the settings of the tables it was given (`wanted`:
  name -> table info, read before the server took them over)."""
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


def _check_restored_contract(client: reverb.Client, served,
                             contract: Optional[Mapping],
                             checkpoint_dir: str) -> None:
  """UserError if the checkpoint's run contract differs from `contract`."""
  info = served.get(table_names.CONTRACT_TABLE)
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


def space_shortfall(checkpoint_dir: str) -> Optional[str]:
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


def write(client: reverb.Client, checkpoint_dir: str, num_tables: int,
          why: str, retry_s: float) -> None:
  """Checkpoints every table (`why`: 'periodic', 'on stop'), then reads the
  checkpoint back. Never raises: a failure is logged, the server serves on,
  and the caller tries again in `retry_s` (named in the log)."""
  try:
    # Sizes read first: inserts continue while the checkpoint is written,
    # so it holds at least these items (until the table is full).
    sizes = tables_lib.table_sizes(client)
    step = one_value.published_train_step(client, timeout_s=1.0)
    shortfall = space_shortfall(checkpoint_dir)
    if shortfall:
      logging.error('checkpoint (%s) not written: %s; keeping the last '
                    'one, still serving, next try in %gs', why, shortfall,
                    retry_s)
      return
    path = client.checkpoint()
  except Exception as e:  # pylint: disable=broad-except
    logging.error('checkpoint (%s) to %s failed: %s; still serving, next '
                  'try in %gs', why, checkpoint_dir, one_line(e), retry_s)
    return
  if _read_back(path, checkpoint_dir, num_tables, why, retry_s):
    logging.info('checkpoint (%s) written to %s: %s%s', why, path, sizes,
                 '' if step is None else f'; weights of train_step {step}')


def _read_back(path: str, checkpoint_dir: str, num_tables: int, why: str,
               retry_s: float) -> bool:
  """Whether the checkpoint Reverb says it wrote to `path` is there and
  whole; logs (and removes a damaged one) if not."""
  # Reverb reports success even when its clean-up deleted the checkpoint
  # it just wrote (an entry of the directory sorting after it), or when it
  # wrote empty files on a full disk.
  if not os.path.isdir(path):
    logging.error('checkpoint (%s) missing: Reverb wrote %s, but it is not '
                  'there (%s holds %s); still serving, next try in %gs',
                  why, path, checkpoint_dir, _listing(checkpoint_dir),
                  retry_s)
    return False
  damage = checkpoint_damage(path, num_tables)
  if damage:
    # Never to be restored: a restart starts from nothing rather than
    # from a damaged checkpoint.
    shutil.rmtree(path, ignore_errors=True)
    logging.error('checkpoint (%s) failed: Reverb wrote %s damaged (%s; '
                  'disk full?) and deleted the one before; removed it, '
                  'still serving, next try in %gs', why, path, damage,
                  retry_s)
    return False
  return True
