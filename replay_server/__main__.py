"""python -m replay_server: serves `uniform_table` and `variables` over Reverb."""

from common import process  # Must precede TensorFlow imports.

from common import cluster_flags as cf


def main(_):
  # pylint: disable=g-import-not-at-top
  from replay_server import server
  from replay_server import tables as tables_lib
  # pylint: enable=g-import-not-at-top
  stop = process.StopRequest().install()
  addresses = cf.replay_addresses()
  shard = server.shard_index(addresses, cf.PORT.value, cf.REPLAY_SHARD.value)
  tables = tables_lib.build_tables(
      cf.ENV.value, cf.agent_config(), cf.replay_config(),
      with_variables=cf.TABLES.value == 'replay_and_variables',
      env_options=cf.env_options())
  server.serve(tables, cf.PORT.value, stop,
               checkpoint_dir=cf.CHECKPOINT_DIR.value,
               checkpoint_interval_s=cf.CHECKPOINT_INTERVAL_S.value,
               actor_lease_grace_s=cf.ACTOR_LEASE_GRACE_S.value,
               contract=cf.run_contract(), shard=shard,
               num_shards=len(addresses),
               actor_lease_timeout_s=cf.ACTOR_LEASE_TIMEOUT_S.value)


if __name__ == '__main__':
  process.run(main, 'replay_server')
