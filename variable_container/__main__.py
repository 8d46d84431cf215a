"""python -m variable_container: serves a variables-only Reverb table."""

from common import process  # Must precede TensorFlow imports.

from common import config as config_lib
from common import config_flags


def main(_):
  # The variable container runs the replay server's serve loop (checkpoints,
  # contract) over its own tables.
  from replay_server import server  # pylint: disable=g-import-not-at-top
  config = config_flags.build(config_lib.VariableContainerConfig)
  server.run_variables_only(config, process.StopRequest().install())


if __name__ == '__main__':
  process.run(main, 'variable_container')
