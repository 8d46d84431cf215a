"""python -m learner: trains SAC from the replay table and pushes weights."""

from common import process  # Must precede TensorFlow imports.

if __name__ == '__main__':
  process.prefer_jemalloc()  # Re-executes; before TensorFlow is loaded.

from common import cluster_flags as cf


def main(_):
  # pylint: disable=g-import-not-at-top
  from learner import strategy as strategy_lib
  from learner import train
  # pylint: enable=g-import-not-at-top
  # Under docker's 30 s stop grace: a learner stuck sampling from a server
  # that is gone still exits on its own.
  stop = process.StopRequest(deadline_s=25).install()
  strategy_lib.split_cpu(cf.LOGICAL_CPU_DEVICES.value)
  strategy = strategy_lib.make_strategy(cf.STRATEGY.value, cf.TPU_ADDRESS.value)
  settings = train.LearnerSettings(
      env_name=cf.ENV.value,
      root_dir=cf.ROOT_DIR.value,
      replay_address=cf.replay_address(),
      variable_address=cf.variable_address(),
      train_steps=cf.TRAIN_STEPS.value,
      agent=cf.agent_config(),
      env_options=cf.env_options(),
      push_interval_steps=cf.PUSH_INTERVAL_STEPS.value,
      iterations_per_call=cf.ITERATIONS_PER_CALL.value,
      sample_parallel_readers=cf.SAMPLE_PARALLEL_READERS.value,
      checkpoint_interval_steps=cf.CHECKPOINT_INTERVAL_STEPS.value,
      policy_save_interval=cf.POLICY_SAVE_INTERVAL.value,
      server_timeout_s=cf.SERVER_TIMEOUT_S.value,
      log_interval_s=cf.LOG_INTERVAL_S.value,
      alive_bonus=cf.ALIVE_BONUS.value,
      prioritized=cf.REPLAY.value == 'prioritized',
      importance_sampling_exponent=cf.IMPORTANCE_SAMPLING_EXPONENT.value,
      replay_shards=cf.replay_addresses(),
      seed=cf.SEED.value,
      contract=cf.run_contract(),
      variables_on_shards=cf.variables_on_shards())
  train.train(settings, strategy, stop)


if __name__ == '__main__':
  process.run(main, 'learner')
