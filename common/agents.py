"""Builds the SAC agent and its networks from a `SacConfig`, as the tutorial does.

Every process that needs the agent's specs or variables (replay server,
learner, actors) calls `create_sac_agent` with the same config, so the
variables it creates have the same structure everywhere.
"""

from typing import Optional

import tensorflow as tf
from tf_agents.agents.ddpg import critic_network
from tf_agents.agents.sac import sac_agent
from tf_agents.agents.sac import tanh_normal_projection_network
from tf_agents.experimental.distributed import reverb_variable_container
from tf_agents.networks import actor_distribution_network
from tf_agents.specs import tensor_spec
from tf_agents.train.utils import spec_utils
from tf_agents.train.utils import train_utils

from common.config import SacConfig
from common.errors import UserError


def check_continuous_actions(env, env_name: str) -> None:
  action_spec = env.action_spec()
  for spec in tf.nest.flatten(action_spec):
    if not tf.as_dtype(spec.dtype).is_floating:
      raise UserError(
          f'--env={env_name} has discrete actions ({spec.dtype}); SAC needs '
          'continuous (float) actions')


def create_sac_agent(env, config: SacConfig,
                     train_step: Optional[tf.Variable] = None,
                     env_name: str = ''):
  """Returns an initialized `SacAgent` for `env`'s specs.

  Call it inside `strategy.scope()` when training under a distribution
  strategy.
  """
  check_continuous_actions(env, env_name)
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
