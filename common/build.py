"""The one preamble every role shares: environment -> train step -> agent ->
the variables the learner pushes and the actors pull.

The learner, the actors, the evaluator and the servers (for their table
signatures) all build their agent here, from the same settings, so every
process of a run agrees on every spec without exchanging files.
"""

import contextlib
import dataclasses
from typing import Any, Optional

import tensorflow as tf
from tf_agents.train.utils import train_utils

from common import config as config_lib
from common import agents
from common import environments
from common.config import AgentConfig


@dataclasses.dataclass
class Built:
  """What `build` made. `env` is None unless `keep_env` was asked for."""
  env: Any
  train_step: tf.Variable
  agent: Any
  # {'policy_variables': collect policy variables, 'train_step': train_step}:
  # the nest of the `variables` table.
  variables: dict


def build(env_name: str, agent_config: AgentConfig,
          env_options: config_lib.EnvOptions = config_lib.EnvOptions(),
          *, env=None, seed: Optional[int] = None, keep_env: bool = False,
          strategy: Optional[tf.distribute.Strategy] = None) -> Built:
  """Builds the agent `agent_config` names for `env_name`'s specs.

  Args:
    env_name: the --env the specs come from.
    agent_config: the agent's hyperparameters.
    env_options: wrappers every process applies to its environments.
    env: an environment already loaded (e.g. the actor's batch); else one is
      loaded with `seed` and closed again unless `keep_env`.
    seed: the loaded environment's seed (`common.seeds.derive`).
    keep_env: return the loaded environment open, in `Built.env`.
    strategy: create the train step and the agent in its scope (learner).
  """
  own_env = env is None
  if own_env:
    env = environments.load_environment(env_name, seed=seed,
                                        options=env_options)
  try:
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
      train_step = train_utils.create_train_step()
      agent = agents.create_agent(env, agent_config, train_step, env_name)
  except BaseException:
    if own_env:
      env.close()
    raise
  if own_env and not keep_env:
    env.close()
    env = None
  return Built(env=env if (keep_env or not own_env) else None,
               train_step=train_step, agent=agent,
               variables=agents.shared_variables(agent, train_step))
