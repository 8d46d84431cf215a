"""The evaluator (`python -m actor --mode=eval`): greedy-policy returns over training.

Follows the learner through the variables table: at every `eval_interval`
train steps, and once at the final train_step, it pulls the weights, runs
`num_eval_episodes` with the greedy policy and records AverageReturn and
AverageEpisodeLength to TensorBoard under `<root_dir>/eval` and as a line of
`<root_dir>/eval/metrics.jsonl`.
"""

import dataclasses
import json
import os
import time
from typing import Callable, List

from absl import logging
from tf_agents.policies import greedy_policy
from tf_agents.policies import py_tf_eager_policy
from tf_agents.train import actor as tfa_actor
from tf_agents.train.utils import train_utils

from common import agents
from common import config as config_lib
from common import environments
from variable_container import VariableContainerClient

EVAL_DIR = 'eval'
METRICS_FILE = 'metrics.jsonl'


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  env_name: str
  root_dir: str
  variable_address: str
  max_train_steps: int
  eval_interval: int = 10000
  num_eval_episodes: int = 20
  sac: config_lib.SacConfig = config_lib.SacConfig()
  server_timeout_s: float = 300.0
  poll_interval_s: float = 1.0


def evaluate(s: EvalSettings,
             should_stop: Callable[[], bool] = lambda: False) -> List[dict]:
  """Evaluates until the final train_step is evaluated; returns the rows."""
  eval_dir = os.path.join(s.root_dir, EVAL_DIR)
  os.makedirs(eval_dir, exist_ok=True)
  env = environments.load_environment(s.env_name, seed=12345)
  train_step = train_utils.create_train_step()
  agent = agents.create_sac_agent(env, s.sac, train_step, s.env_name)
  variables = agents.shared_variables(agent, train_step)
  container = VariableContainerClient(s.variable_address, variables,
                                      s.server_timeout_s, 'evaluator',
                                      should_stop)
  eval_actor = tfa_actor.Actor(
      env,
      py_tf_eager_policy.PyTFEagerPolicy(
          greedy_policy.GreedyPolicy(agent.policy), use_tf_function=True),
      train_step,
      episodes_per_run=s.num_eval_episodes,
      metrics=tfa_actor.eval_metrics(s.num_eval_episodes),
      summary_dir=eval_dir)
  rows = []
  next_eval = 0
  while not should_stop():
    step = container.latest_train_step()
    if step is None or (step < next_eval and step < s.max_train_steps):
      time.sleep(s.poll_interval_s)
      continue
    step = container.pull_into(variables)
    started = time.monotonic()
    eval_actor.run()
    results = {m.name: float(m.result()) for m in eval_actor.metrics}
    row = {'train_step': step,
           'AverageReturn': results['AverageReturn'],
           'AverageEpisodeLength': results['AverageEpisodeLength'],
           'eval_seconds': round(time.monotonic() - started, 2),
           'time': time.time()}
    rows.append(row)
    with open(os.path.join(eval_dir, METRICS_FILE), 'a') as f:
      f.write(json.dumps(row) + '\n')
    logging.info('evaluator: train_step %d  AverageReturn %.2f  '
                 'AverageEpisodeLength %.1f (%d episodes, %.1fs)', step,
                 row['AverageReturn'], row['AverageEpisodeLength'],
                 s.num_eval_episodes, row['eval_seconds'])
    if step >= s.max_train_steps:
      break
    next_eval = (step // s.eval_interval + 1) * s.eval_interval
  env.close()
  return rows
