"""python -m actor: collects experience (--mode=collect) or evaluates (--mode=eval)."""

from common import process  # Must precede TensorFlow imports.

from common import config as config_lib
from common import config_flags


def main(_):
  # pylint: disable=g-import-not-at-top
  if config_flags.FLAGS.mode == 'eval':
    from actor import evaluate
    config = config_flags.build(config_lib.EvalConfig)
    run = evaluate.evaluate
  else:
    from actor import collect
    config = config_flags.build(config_lib.CollectConfig)
    run = collect.collect
  # pylint: enable=g-import-not-at-top
  # A stop that takes longer (an environment stuck in a step) ends the
  # actor anyway: SIGTERM always ends it.
  run(config, process.StopRequest(deadline_s=config.stop_timeout_s).install())
  # Its writers, summaries, videos and environments are closed by now. The
  # interpreter's teardown of what Reverb and TensorFlow still hold (client
  # and sampler threads) once aborted an actor that had finished ("terminate
  # called without an active exception", exit -6): none is run.
  process.exit_now(0)


if __name__ == '__main__':
  process.run(main, 'actor')
