"""DQN for discrete actions (the TF-Agents DQN tutorial's, plus what Ape-X uses).

Double DQN by default (the squared TD loss stays the default: the Huber loss
was measured worse on CartPole, see LEARNING.md), N-step returns (`n_step`:
items of N+1 steps), and Ape-X's spread of exploration over actors: actor i
of N explores with epsilon_i = epsilon ** (1 + alpha * i / (N - 1)).
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
from tf_agents.agents.dqn import dqn_agent
from tf_agents.networks import q_network
from tf_agents.train.utils import spec_utils
from tf_agents.train.utils import train_utils
from tf_agents.utils import common as tfa_common

from common.agents import networks
from common import compat
from common.config import DqnConfig
from common.errors import UserError

_LOSSES = {'huber': tfa_common.element_wise_huber_loss,
           'squared': tfa_common.element_wise_squared_loss}


def create(env, config: DqnConfig, train_step: Optional[tf.Variable] = None,
           env_name: str = ''):
  """An initialized (Double) DQN agent with an epsilon-greedy collect policy."""
  if not networks.has_discrete_actions(env):
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
  agent_class = dqn_agent.DdqnAgent if config.double else dqn_agent.DqnAgent
  agent = agent_class(
      time_step_spec,
      action_spec,
      q_network=q_net,
      optimizer=tf.compat.v1.train.AdamOptimizer(
          learning_rate=config.learning_rate),
      epsilon_greedy=config.epsilon_greedy,
      n_step_update=config.n_step,
      target_update_tau=config.target_update_tau,
      target_update_period=config.target_update_period,
      td_errors_loss_fn=_LOSSES[config.loss],
      gamma=config.gamma,
      train_step_counter=train_step)
  agent.initialize()
  return agent


def apex_epsilon(epsilon: float, alpha: float, actor_index: int,
                 num_actors: int) -> float:
  """Ape-X: epsilon ** (1 + alpha * i / (N - 1)); one actor gets epsilon."""
  if num_actors <= 1:
    return epsilon
  return epsilon ** (1 + alpha * actor_index / (num_actors - 1))


def collect_config(config: DqnConfig, actor_index: int,
                   num_actors: int) -> DqnConfig:
  if config.epsilon_schedule != 'apex':
    return config
  return dataclasses.replace(config, epsilon_greedy=apex_epsilon(
      config.apex_epsilon, config.apex_alpha, actor_index, num_actors))


def train_with_td_errors(agent):
  """One train step; DQN's own per-item TD errors are the priorities."""

  agent_train = agent.train  # Bound now: TF-Agents' Learner rewraps it.

  def train(experience, weights):
    loss_info = agent_train(experience, weights=weights)
    return loss_info, tf.abs(tf.reshape(loss_info.extra.td_error, [-1]))

  return train


def greedy_policy(agent):
  return agent.policy


def collect_policy(agent):
  return agent.collect_policy


class NumpyCollectPolicy:
  """DQN's collect policy in NumPy: epsilon-greedy over the Q-network.

  As TF-Agents' `EpsilonGreedyPolicy` over a `GreedyPolicy(QPolicy)`: with
  probability epsilon a uniformly random action (which may be the greedy
  one), otherwise the argmax of the Q-values, shifted by the spec's minimum.
  """

  def __init__(self, layers, action_spec, epsilon: float,
               seed: Optional[int] = None):
    self._q_network = networks.NumpyLayers(layers)
    self._shape = tuple(action_spec.shape)
    self._dtype = action_spec.dtype.as_numpy_dtype
    self._minimum = int(np.min(action_spec.minimum))
    self._maximum = int(np.max(action_spec.maximum))
    self.epsilon = float(epsilon)
    self._rng = np.random.default_rng(seed)

  def refresh(self) -> None:
    self._q_network.refresh()

  def q_values(self, observations: np.ndarray) -> np.ndarray:
    return self._q_network(observations)

  def greedy(self, observations: np.ndarray) -> np.ndarray:
    best = np.argmax(self.q_values(observations), axis=-1) + self._minimum
    return best.astype(self._dtype).reshape((-1,) + self._shape)

  def __call__(self, observations: np.ndarray) -> np.ndarray:
    actions = self.greedy(observations)
    explore = self._rng.random(len(actions)) < self.epsilon
    if explore.any():
      actions[explore] = self._rng.integers(
          self._minimum, self._maximum + 1,
          size=(int(explore.sum()),) + self._shape).astype(self._dtype)
    return actions


def numpy_collect_policy(agent, config: DqnConfig,
                         seed: Optional[int] = None):
  """`NumpyCollectPolicy` for `agent`, or None for networks it cannot run."""
  net = compat.q_network_layers(agent)
  action_specs = tf.nest.flatten(agent.action_spec)
  if net is None or len(action_specs) != 1:
    return None
  layers = networks.encoder_layers(net.encoder)
  # The collect policy carries the agent's splitter (an action mask, which
  # the NumPy policy does not apply).
  if (layers is None or
      not networks.NumpyLayers.supports([net.q_value_layer]) or
      agent.collect_policy.observation_and_action_constraint_splitter
      is not None or
      callable(config.epsilon_greedy)):
    return None
  return NumpyCollectPolicy(list(layers) + [net.q_value_layer],
                            action_specs[0], config.epsilon_greedy, seed)
