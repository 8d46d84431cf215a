"""python -m replay_server: serves `uniform_table` and `variables` over Reverb."""

import socket

from common import process  # Must precede TensorFlow imports.

from common import cluster_flags as cf
from common.errors import UserError

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


def shard_index(addresses, port: int, replay_shard: int = -1) -> int:
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


def main(_):
  from common import tables as tables_lib  # pylint: disable=g-import-not-at-top
  stop = process.StopRequest().install()
  addresses = cf.replay_addresses()
  shard = shard_index(addresses, cf.PORT.value, cf.REPLAY_SHARD.value)
  tables = tables_lib.build_tables(
      cf.ENV.value, cf.agent_config(), cf.replay_config(),
      with_variables=cf.TABLES.value == 'replay_and_variables',
      env_options=cf.env_options())
  tables_lib.serve(tables, cf.PORT.value, stop,
                   checkpoint_dir=cf.CHECKPOINT_DIR.value,
                   checkpoint_interval_s=cf.CHECKPOINT_INTERVAL_S.value,
                   actor_lease_grace_s=cf.ACTOR_LEASE_GRACE_S.value,
                   contract=cf.run_contract(), shard=shard,
                   num_shards=len(addresses),
                   actor_lease_timeout_s=cf.ACTOR_LEASE_TIMEOUT_S.value)


if __name__ == '__main__':
  process.run(main, 'replay_server')
