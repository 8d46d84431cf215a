"""python -m learner: trains the agent from the replay table and pushes weights."""

from common import process  # Must precede TensorFlow imports.

if __name__ == '__main__':
  process.prefer_jemalloc()  # Re-executes; before TensorFlow is loaded.

from common import config as config_lib
from common import config_flags


def main(_):
  # pylint: disable=g-import-not-at-top
  from learner import strategy as strategy_lib
  from learner import train
  # pylint: enable=g-import-not-at-top
  config = config_flags.build(config_lib.LearnerConfig)
  # Under docker's 30 s stop grace: a learner stuck sampling from a server
  # that is gone still exits on its own.
  stop = process.StopRequest(deadline_s=25).install()
  strategy_lib.split_cpu(config.logical_cpu_devices)
  strategy = strategy_lib.make_strategy(
      config.strategy, config.tpu_address, config.learner_workers,
      config.learner_index, config.worker_timeout_s,
      register_timeout_s=config.server_timeout_s)
  train.train(config, strategy, stop)
  process.exit_now(0)  # Final state written; no teardown to wait on.


if __name__ == '__main__':
  process.run(main, 'learner')
