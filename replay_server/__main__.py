"""python -m replay_server: serves `uniform_table` and `variables` over Reverb."""

from common import process  # Must precede TensorFlow imports.

from common import config as config_lib
from common import config_flags


def main(_):
  from replay_server import server  # pylint: disable=g-import-not-at-top
  config = config_flags.build(config_lib.ReplayServerConfig)
  server.run(config, process.StopRequest().install())


if __name__ == '__main__':
  process.run(main, 'replay_server')
