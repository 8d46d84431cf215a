"""python -m variable_container: serves a variables-only Reverb table."""

from common import process  # Must precede TensorFlow imports.

from common import cluster_flags


def main(_):
  # pylint: disable=g-import-not-at-top
  from replay_server import server
  from replay_server import tables as tables_lib
  # pylint: enable=g-import-not-at-top
  stop = process.StopRequest().install()
  tables = tables_lib.build_tables(cluster_flags.ENV.value,
                                   cluster_flags.agent_config(), replay=None,
                                   env_options=cluster_flags.env_options())
  server.serve(tables, cluster_flags.PORT.value, stop,
               checkpoint_dir=cluster_flags.CHECKPOINT_DIR.value,
               checkpoint_interval_s=cluster_flags.CHECKPOINT_INTERVAL_S.value,
               contract=cluster_flags.run_contract())


if __name__ == '__main__':
  process.run(main, 'variable_container')
