"""Builds the agent and its networks from its config, as the tutorials do.

SAC (continuous actions) follows the SAC Minitaur tutorial, DQN (discrete
actions) the DQN tutorial. Every process that needs the agent's specs or
variables (replay server, learner, actors, evaluator) calls `create_agent`
with the same config, so the variables have the same structure everywhere.
"""

from typing import Optional

import numpy as np
import tensorflow as tf
from tf_agents.agents.ddpg import critic_network
from tf_agents.agents.dqn import dqn_agent
from tf_agents.agents.sac import sac_agent
from tf_agents.agents.sac import tanh_normal_projection_network
from tf_agents.experimental.distributed import reverb_variable_container
from tf_agents.networks import actor_distribution_network
from tf_agents.networks import q_network
from tf_agents.specs import tensor_spec
from tf_agents.train.utils import spec_utils
from tf_agents.train.utils import train_utils
from tf_agents.utils import common as tfa_common

from common.config import AgentConfig
from common.config import DqnConfig
from common.config import SacConfig
from common.errors import UserError


def _has_discrete_actions(env) -> bool:
  return not all(tf.as_dtype(s.dtype).is_floating
                 for s in tf.nest.flatten(env.action_spec()))


def create_agent(env, config: AgentConfig,
                 train_step: Optional[tf.Variable] = None, env_name: str = ''):
  """The agent `config` names (SAC or DQN), initialized, for `env`'s specs.

  Call it inside `strategy.scope()` when training under a distribution
  strategy.
  """
  if isinstance(config, DqnConfig):
    return create_dqn_agent(env, config, train_step, env_name)
  return create_sac_agent(env, config, train_step, env_name)


def create_dqn_agent(env, config: DqnConfig,
                     train_step: Optional[tf.Variable] = None,
                     env_name: str = ''):
  """DQN with a QNetwork and an epsilon-greedy collect policy."""
  if not _has_discrete_actions(env):
    raise UserError(f'--env={env_name} has continuous actions; DQN needs '
                    'discrete ones: use --agent=sac, or add '
                    '--discretize_actions=N')
  flat = tf.nest.flatten(env.action_spec())
  if len(flat) != 1 or int(np.prod(flat[0].shape)) != 1:
    raise UserError(f'--env={env_name}: DQN handles a single discrete '
                    f'action; this environment has {env.action_spec()}')
  _, action_spec, time_step_spec = spec_utils.get_tensor_specs(env)
  if train_step is None:
    train_step = train_utils.create_train_step()
  q_net = q_network.QNetwork(time_step_spec.observation, action_spec,
                             fc_layer_params=tuple(config.q_fc_layers))
  agent = dqn_agent.DqnAgent(
      time_step_spec,
      action_spec,
      q_network=q_net,
      optimizer=tf.compat.v1.train.AdamOptimizer(
          learning_rate=config.learning_rate),
      epsilon_greedy=config.epsilon_greedy,
      target_update_tau=config.target_update_tau,
      target_update_period=config.target_update_period,
      td_errors_loss_fn=tfa_common.element_wise_squared_loss,
      gamma=config.gamma,
      train_step_counter=train_step)
  agent.initialize()
  return agent


def create_sac_agent(env, config: SacConfig,
                     train_step: Optional[tf.Variable] = None,
                     env_name: str = ''):
  """Returns an initialized `SacAgent` for `env`'s specs.

  Call it inside `strategy.scope()` when training under a distribution
  strategy.
  """
  if _has_discrete_actions(env):
    raise UserError(
        f'--env={env_name} has discrete actions; SAC needs continuous ones: '
        'use --agent=dqn')
  observation_spec, action_spec, time_step_spec = (
      spec_utils.get_tensor_specs(env))
  if train_step is None:
    train_step = train_utils.create_train_step()
  critic_net = critic_network.CriticNetwork(
      (observation_spec, action_spec),
      observation_fc_layer_params=None,
      action_fc_layer_params=None,
      joint_fc_layer_params=tuple(config.critic_joint_fc_layers),
      kernel_initializer='glorot_uniform',
      last_kernel_initializer='glorot_uniform')
  actor_net = actor_distribution_network.ActorDistributionNetwork(
      observation_spec,
      action_spec,
      fc_layer_params=tuple(config.actor_fc_layers),
      continuous_projection_net=(
          tanh_normal_projection_network.TanhNormalProjectionNetwork))
  agent = sac_agent.SacAgent(
      time_step_spec,
      action_spec,
      actor_network=actor_net,
      critic_network=critic_net,
      actor_optimizer=tf.compat.v1.train.AdamOptimizer(
          learning_rate=config.actor_learning_rate),
      critic_optimizer=tf.compat.v1.train.AdamOptimizer(
          learning_rate=config.critic_learning_rate),
      alpha_optimizer=tf.compat.v1.train.AdamOptimizer(
          learning_rate=config.alpha_learning_rate),
      target_update_tau=config.target_update_tau,
      target_update_period=config.target_update_period,
      td_errors_loss_fn=tf.math.squared_difference,
      gamma=config.gamma,
      reward_scale_factor=config.reward_scale_factor,
      target_entropy=config.target_entropy,
      train_step_counter=train_step)
  agent.initialize()
  return agent


def shared_variables(agent, train_step: tf.Variable):
  """The nest pushed to the `variables` table: collect policy weights + step."""
  return {
      reverb_variable_container.POLICY_KEY: agent.collect_policy.variables(),
      reverb_variable_container.TRAIN_STEP_KEY: train_step,
  }


def replay_signature(agent):
  """Signature of `uniform_table`: collect_data_spec with an outer time dim."""
  return tensor_spec.add_outer_dim(
      tensor_spec.from_spec(agent.collect_data_spec))


def variable_signature(variables):
  """Signature of the `variables` table for the nest `variables`."""
  return tf.nest.map_structure(
      lambda v: tf.TensorSpec(v.shape, dtype=v.dtype), variables)
