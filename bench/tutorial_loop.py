"""The TF-Agents SAC Minitaur tutorial's single-process loop, as a baseline.

The tutorial's own calls and hyperparameters: a local Reverb table (uniform,
FIFO, MinSize(1)), `initial_collect_steps` random steps, then one collect step
and one `learner.run(iterations=1)` per iteration. Evaluated the way the
distributed system's evaluator does it (greedy policy, same episodes, same
interval), and written as `curve.jsonl` rows in the format of
`bench/learning.py`, so both draw on the same axes.

  python -m bench.tutorial_loop --out=runs/tutorial_loop --train_steps=100000
"""

import json
import os
import sys
import time

from common import process  # Must precede TensorFlow imports.

from absl import flags
from absl import logging

from bench import fixtures

OUT = flags.DEFINE_string('out', 'runs/learning/tutorial_loop/seed_0',
                          'Directory for curve.jsonl.')
ENV = flags.DEFINE_string('env', 'MinitaurBulletEnv-v0', 'Environment.')
TRAIN_STEPS = flags.DEFINE_integer('train_steps', 100000, 'Iterations.',
                                   lower_bound=1)
INITIAL_COLLECT_STEPS = flags.DEFINE_integer('initial_collect_steps', 10000,
                                             'Random steps first.',
                                             lower_bound=0)
REPLAY_CAPACITY = flags.DEFINE_integer('replay_capacity', 10000,
                                       'Replay buffer capacity.', lower_bound=1)
EVAL_INTERVAL = flags.DEFINE_integer('eval_interval', 10000,
                                     'Iterations between evaluations.',
                                     lower_bound=1)
NUM_EVAL_EPISODES = flags.DEFINE_integer('num_eval_episodes', 10,
                                         'Greedy episodes per evaluation.',
                                         lower_bound=1)
SEED = flags.DEFINE_integer('seed', 0, 'Seed.', lower_bound=0)


def _setup():
  """Seeds, a fresh curve.jsonl, the built agent and the eval environment.

  Returns (curve path, config, `build.build`'s result, eval env).
  """
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import tensorflow as tf

  from common import build
  from common import config as config_lib
  from common import environments
  from common import seeds
  # pylint: enable=g-import-not-at-top

  # Seeds as the cluster derives them: the collect env as actor 0's first
  # environment, the eval env as the evaluator's.
  tf.random.set_seed(seeds.derive(SEED.value, 'tutorial_loop'))
  np.random.seed(seeds.derive(SEED.value, 'tutorial_loop'))
  os.makedirs(OUT.value, exist_ok=True)
  curve_path = os.path.join(OUT.value, 'curve.jsonl')
  if os.path.exists(curve_path):
    os.remove(curve_path)
  config = config_lib.SacConfig()  # The tutorial's hyperparameters.
  built = build.build(ENV.value, config,
                      seed=seeds.derive(SEED.value, 'actor', 0, 'env', 0),
                      keep_env=True)
  eval_env = environments.load_environment(
      ENV.value, seed=seeds.derive(SEED.value, 'evaluator', 'env'))
  return curve_path, config, built, eval_env


def _policies(tf_agent, collect_env):
  """(collect, greedy eval, random) py policies, as the tutorial's."""
  # pylint: disable=g-import-not-at-top
  from tf_agents.policies import greedy_policy
  from tf_agents.policies import py_tf_eager_policy
  from tf_agents.policies import random_py_policy
  # pylint: enable=g-import-not-at-top
  collect_policy = py_tf_eager_policy.PyTFEagerPolicy(
      tf_agent.collect_policy, use_tf_function=True)
  eval_policy = py_tf_eager_policy.PyTFEagerPolicy(
      greedy_policy.GreedyPolicy(tf_agent.policy), use_tf_function=True)
  random_policy = random_py_policy.RandomPyPolicy(
      collect_env.time_step_spec(), collect_env.action_spec())
  return collect_policy, eval_policy, random_policy


def _evaluator(eval_env, eval_policy, train_step, curve_path, started):
  """evaluate(step): greedy episodes, one curve.jsonl row, a log line."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from tf_agents.train import actor
  # pylint: enable=g-import-not-at-top
  returns, lengths = [], []
  current = [0.0, 0]

  def observe(traj):
    if traj.is_first():
      current[:] = [0.0, 0]
    current[0] += float(np.sum(traj.reward))
    current[1] += int(not traj.is_boundary())
    if traj.is_last():
      returns.append(current[0])
      lengths.append(current[1])

  eval_actor = actor.Actor(eval_env, eval_policy, train_step,
                           episodes_per_run=NUM_EVAL_EPISODES.value,
                           observers=[observe])

  def evaluate(step):
    returns.clear()
    lengths.clear()
    eval_actor.run()
    row = {'train_step': step,
           'env_steps': INITIAL_COLLECT_STEPS.value + step,
           'wall_s': round(time.monotonic() - started, 1),
           'return_mean': float(np.mean(returns)),
           'return_std': float(np.std(returns)),
           'episode_length': float(np.mean(lengths)),
           'num_episodes': len(returns)}
    with open(curve_path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    logging.info('tutorial_loop: train_step %d  return %.2f +- %.2f  '
                 'episode length %.0f', step, row['return_mean'],
                 row['return_std'], row['episode_length'])

  return evaluate


def _train(collect_actor, agent_learner, evaluate):
  """--train_steps iterations of one collect step and one train step."""
  from common import progress  # pylint: disable=g-import-not-at-top
  evaluate(0)
  meter = progress.RateMeter(0, TRAIN_STEPS.value)
  for step in range(1, TRAIN_STEPS.value + 1):
    collect_actor.run()
    agent_learner.run(iterations=1)
    if step % EVAL_INTERVAL.value == 0 or step == TRAIN_STEPS.value:
      evaluate(step)
    if meter.due(30):
      meter.update(step)
      logging.info('tutorial_loop: train_step %d/%d  %.1f steps/s  ETA %s',
                   step, TRAIN_STEPS.value, meter.rate, meter.eta(step))


def main(_):
  # pylint: disable=g-import-not-at-top
  from tf_agents.train import actor
  from tf_agents.train import learner
  # pylint: enable=g-import-not-at-top

  curve_path, config, built, eval_env = _setup()
  collect_env, train_step, tf_agent = built.env, built.train_step, built.agent
  reverb_server, dataset, rb_observer = fixtures.tutorial_replay(
      tf_agent, REPLAY_CAPACITY.value, config.batch_size)
  collect_policy, eval_policy, random_policy = _policies(tf_agent,
                                                         collect_env)

  started = time.monotonic()
  actor.Actor(collect_env, random_policy, train_step,
              steps_per_run=INITIAL_COLLECT_STEPS.value,
              observers=[rb_observer]).run()
  collect_actor = actor.Actor(collect_env, collect_policy, train_step,
                              steps_per_run=1, observers=[rb_observer])
  agent_learner = learner.Learner(OUT.value, train_step, tf_agent,
                                  lambda: dataset)
  evaluate = _evaluator(eval_env, eval_policy, train_step, curve_path,
                        started)
  _train(collect_actor, agent_learner, evaluate)
  rb_observer.close()
  reverb_server.stop()


if __name__ == '__main__':
  sys.exit(process.run(main, 'tutorial_loop'))
