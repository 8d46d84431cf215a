"""python -m actor: collects experience (--mode=collect) or evaluates (--mode=eval)."""

from common import process  # Must precede TensorFlow imports.

from common import cluster_flags as cf


def main(_):
  # A stop that takes longer (an environment stuck in a step) ends the
  # actor anyway: SIGTERM always ends it.
  stop = process.StopRequest(deadline_s=cf.STOP_TIMEOUT_S.value).install()
  if cf.MODE.value == 'eval':
    from actor import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(_eval_settings(evaluate), stop)
    return
  from actor import collect  # pylint: disable=g-import-not-at-top
  collect.collect(_actor_settings(collect), stop)


def _eval_settings(evaluate):
  """The evaluator's settings from the flags."""
  return evaluate.EvalSettings(
      env_name=cf.ENV.value,
      root_dir=cf.ROOT_DIR.value,
      variable_address=cf.variable_address(),
      max_train_steps=cf.max_train_steps(),
      eval_interval=cf.EVAL_INTERVAL.value,
      num_eval_episodes=cf.NUM_EVAL_EPISODES.value,
      agent=cf.agent_config(),
      env_options=cf.env_options(),
      server_timeout_s=cf.SERVER_TIMEOUT_S.value,
      video_episodes=cf.VIDEO_EPISODES.value,
      video_interval=cf.VIDEO_INTERVAL.value,
      video_size=cf.video_size(),
      replay_shards=cf.replay_addresses(),
      seed=cf.SEED.value,
      contract=cf.run_contract(),
      variables_on_shards=cf.variables_on_shards(),
      env_step_timeout_s=cf.ENV_STEP_TIMEOUT_S.value)


def _actor_settings(collect):
  """The collecting actor's settings from the flags."""
  return collect.ActorSettings(
      env_name=cf.ENV.value,
      root_dir=cf.ROOT_DIR.value,
      replay_address=cf.replay_address(),
      variable_address=cf.variable_address(),
      max_train_steps=cf.max_train_steps(),
      task=cf.task(),
      num_actors=cf.NUM_ACTORS.value,
      initial_collect_steps=cf.INITIAL_COLLECT_STEPS.value,
      pull_interval_steps=cf.PULL_INTERVAL_STEPS.value,
      envs_per_actor=cf.ENVS_PER_ACTOR.value,
      env_processes=cf.ENV_PROCESSES.value,
      agent=cf.agent_config(),
      env_options=cf.env_options(),
      server_timeout_s=cf.SERVER_TIMEOUT_S.value,
      log_interval_s=cf.LOG_INTERVAL_S.value,
      seed=cf.SEED.value,
      replay_shards=cf.replay_addresses(),
      contract=cf.run_contract(),
      variables_on_shards=cf.variables_on_shards(),
      env_step_timeout_s=cf.ENV_STEP_TIMEOUT_S.value)


if __name__ == '__main__':
  process.run(main, 'actor')
