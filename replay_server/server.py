"""Serving the tables: start (restore checks, the port, the run contract),
the loop that runs until stopped, and which shard this server is.

The loop is a list of triggers checked once a second: reading actor-index
lease renewals, a checkpoint every `--checkpoint_interval_s` and the table
sizes in the log. A failure of any of them is logged and tried again later;
it never stops the server.
"""

import errno
import socket
import time
from typing import Callable, List, Mapping, Optional, Sequence

from absl import logging
import reverb

from common import config as config_lib
from common import table_names
from common.errors import UserError
from common.errors import one_line
from replay_server import actor_indices
from replay_server import checkpoints
from replay_server import tables as tables_lib
from variable_container import contract as contract_lib

_LOCAL_HOSTS = ('localhost', '127.0.0.1', '::1', '[::1]', '0.0.0.0')


def _is_this_host(host: str) -> bool:
  if host in _LOCAL_HOSTS or host.startswith('127.'):
    return True
  try:
    if host in (socket.gethostname(), socket.getfqdn()):
      return True
    # A service name (compose, a Kubernetes headless Service) resolves to
    # this container's own address.
    own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(),
                                                     None)}
    return bool(own & {info[4][0] for info in socket.getaddrinfo(host, None)})
  except OSError:
    return False


def shard_index(addresses: Sequence[str], port: int,
                replay_shard: int = -1) -> int:
  """This server's position in --replay_address (--replay_shard if given)."""
  if replay_shard >= 0:
    if replay_shard >= len(addresses):
      raise UserError(
          f'--replay_shard={replay_shard}, but --replay_address names '
          f'{len(addresses)} shard(s); give the position of this server in '
          '--replay_address (from 0)')
    return replay_shard
  if len(addresses) == 1:
    return 0
  ports = [i for i, a in enumerate(addresses)
           if a.rpartition(':')[2] == str(port)]
  local = [i for i in ports if _is_this_host(addresses[i].rpartition(':')[0])]
  for found in (ports, local):
    if len(found) == 1:
      return found[0]
  raise UserError(
      f'cannot tell which of the {len(addresses)} --replay_address shards '
      f'this server (--port={port}) is: give --replay_shard=<its position in '
      '--replay_address, from 0>')


def port_is_free(port: int) -> bool:
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


def start_server(tables: List[reverb.Table], port: int,
                 checkpoint_dir: str = '',
                 contract: Optional[Mapping] = None) -> reverb.Server:
  """Starts serving; with `checkpoint_dir`, first restores its latest checkpoint.

  The restored tables must have the settings of `tables` (the flags') and,
  where the checkpoint holds one, the run `contract`: otherwise the server
  is stopped and a UserError names the difference.
  """
  checkpointer = (checkpoints.checkpointer(checkpoint_dir) if checkpoint_dir
                  else None)
  if not port_is_free(port):
    raise UserError(f'port {port} is already in use; stop whatever holds it '
                    'or pick another --port')
  # Read before the server takes the tables over.
  wanted = {t.name: t.info for t in tables}
  try:
    server = reverb.Server(tables, port=port, checkpointer=checkpointer)
  except Exception as e:  # pylint: disable=broad-except
    reason = one_line(e, 200)
    if checkpoint_dir:
      raise checkpoints.restore_error(reason, checkpoint_dir) from None
    raise UserError(f'cannot serve on port {port} ({reason})') from None
  if checkpoint_dir:
    try:
      client = reverb.Client(f'localhost:{server.port}')
      served = client.server_info(timeout=30)
      checkpoints.check_restored(client, served, wanted, contract,
                                 checkpoint_dir)
    except BaseException:
      server.stop()
      raise
  return server


def _publish_contract(client: reverb.Client,
                      contract: Optional[Mapping]) -> None:
  if contract is None:
    return
  if table_names.CONTRACT_TABLE in client.server_info(timeout=10):
    contract_lib.publish(client, contract)


def _announce(server: reverb.Server, tables: List[reverb.Table],
              contract: Optional[Mapping], checkpoint_dir: str,
              checkpoint_interval_s: float) -> reverb.Client:
  """Publishes the run contract and logs what is served; a client of it."""
  client = reverb.Client(f'localhost:{server.port}')
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
                 checkpoint_interval_s, tables_lib.table_sizes(client))
  return client


def _actor_indices(
    tables: List[reverb.Table], address: str, grace_s: float, shard: int,
    num_shards: int,
    lease_timeout_s: float) -> Optional[actor_indices.ActorIndices]:
  """The `--task=auto` index keeper, where the actor-index queue is served."""
  if not any(t.name == table_names.ACTOR_ID_TABLE for t in tables):
    return None
  keeper = actor_indices.ActorIndices(
      address, grace_s, shard=shard, num_shards=num_shards,
      lease_timeout_s=lease_timeout_s)
  logging.info('actor indices: handed out in %gs, after live actors have '
               'renewed theirs', grace_s)
  return keeper


class _Every:
  """A trigger: calls `fn` once `interval_s` has passed since its last call
  (or since it was made); a failure is logged as `what` and tried again at
  the next interval."""

  def __init__(self, interval_s: float, what: str, fn: Callable[[], None]):
    self._interval_s, self._what, self._fn = interval_s, what, fn
    self._last = time.monotonic()

  def __call__(self, now: float) -> None:
    if now - self._last < self._interval_s:
      return
    self._last = now
    try:
      self._fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s failed: %s; still serving, trying again later',
                      self._what, one_line(e))


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
  client = _announce(server, tables, contract, checkpoint_dir,
                     checkpoint_interval_s)
  keeper = _actor_indices(tables, f'localhost:{server.port}',
                          actor_lease_grace_s, shard, num_shards,
                          actor_lease_timeout_s)

  def checkpoint(why: str) -> None:
    checkpoints.write(client, checkpoint_dir, len(tables), why,
                      checkpoint_interval_s)

  triggers = []
  if keeper is not None:
    triggers.append(_Every(0.0, 'reading actor index leases', keeper.poll))
  if checkpoint_dir:
    # `checkpoints.write` logs its own failures.
    triggers.append(_Every(checkpoint_interval_s, 'checkpoint',
                           lambda: checkpoint('periodic')))
  triggers.append(_Every(
      report_interval_s, 'reading table sizes',
      lambda: logging.info('table sizes: %s', tables_lib.table_sizes(client))))
  try:
    while not should_stop.wait(1.0):
      now = time.monotonic()
      for trigger in triggers:
        trigger(now)
    if checkpoint_dir:
      checkpoint('on stop')
  finally:
    logging.info('stopping server on port %d', server.port)
    server.stop()


def run(config: config_lib.ReplayServerConfig, should_stop) -> None:
  """python -m replay_server: builds the tables `config` names, serves them."""
  tables = tables_lib.build_tables(
      config.env_name, config.agent, config.replay,
      with_variables=config.tables == 'replay_and_variables',
      env_options=config.env_options)
  serve(tables, config.port, should_stop,
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_interval_s=config.checkpoint_interval_s,
        actor_lease_grace_s=config.actor_lease_grace_s,
        contract=config.contract,
        shard=shard_index(config.shards, config.port, config.replay_shard),
        num_shards=len(config.shards),
        actor_lease_timeout_s=config.actor_lease_timeout_s)


def run_variables_only(config: config_lib.VariableContainerConfig,
                       should_stop) -> None:
  """python -m variable_container: the variables' tables alone."""
  tables = tables_lib.build_tables(config.env_name, config.agent, replay=None,
                                   env_options=config.env_options)
  serve(tables, config.port, should_stop,
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_interval_s=config.checkpoint_interval_s,
        contract=config.contract)
