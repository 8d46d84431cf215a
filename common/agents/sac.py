"""Soft Actor-Critic, as the SAC Minitaur tutorial builds it (continuous actions).

TF-Agents' SAC trains on 2-step items (s, a, r, s'): it has no n-step
returns, so its replay items are always 2 steps long.
"""

import contextlib
import threading
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
from tf_agents.agents.ddpg import critic_network
from tf_agents.agents.sac import sac_agent
from tf_agents.agents.sac import tanh_normal_projection_network
from tf_agents.networks import actor_distribution_network
from tf_agents.train.utils import spec_utils
from tf_agents.train.utils import train_utils

from common.agents import networks
from common import compat
from common.config import SacConfig
from common.errors import UserError


class _TdErrorKeeper:
  """SAC's critic loss (squared TD error) that can also keep |TD error|.

  SAC reduces its per-item TD errors to one loss inside `train`; prioritized
  replay needs them per item, without a second forward pass. TF-Agents calls
  this once per critic; inside `keeping()` the |TD errors| of both critics
  are kept (per thread: MirroredStrategy runs each replica in its own).
  """

  def __init__(self):
    self._local = threading.local()

  def __call__(self, target, prediction):
    kept = getattr(self._local, 'kept', None)
    if kept is not None:
      kept.append(tf.abs(target - prediction))
    return tf.math.squared_difference(target, prediction)

  @contextlib.contextmanager
  def keeping(self):
    self._local.kept = []
    try:
      yield self._local.kept
    finally:
      self._local.kept = None


def create(env, config: SacConfig, train_step: Optional[tf.Variable] = None,
           env_name: str = ''):
  """An initialized `SacAgent` for `env`'s specs."""
  if networks.has_discrete_actions(env):
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
  td_errors = _TdErrorKeeper()
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
      td_errors_loss_fn=td_errors,
      gamma=config.gamma,
      reward_scale_factor=config.reward_scale_factor,
      target_entropy=config.target_entropy,
      gradient_clipping=config.gradient_clipping,
      train_step_counter=train_step)
  agent.initialize()
  agent.td_error_keeper = td_errors
  return agent


def collect_config(config: SacConfig, actor_index: int,
                   num_actors: int) -> SacConfig:
  del actor_index, num_actors  # Every actor samples from the same policy.
  return config


def train_with_td_errors(agent):
  """One train step; the priorities are the mean |TD error| of both critics."""

  agent_train = agent.train  # Bound now: TF-Agents' Learner rewraps it.

  def train(experience, weights):
    with agent.td_error_keeper.keeping() as kept:
      loss_info = agent_train(experience, weights=weights)
    return loss_info, tf.reshape(tf.add_n(kept) / len(kept), [-1])

  return train


def greedy_policy(agent):
  return agent.policy


def collect_policy(agent):
  return agent.collect_policy


class NumpyCollectPolicy:
  """SAC's collect policy in NumPy: a tanh-squashed diagonal Gaussian.

  The math of TF-Agents' `ActorDistributionNetwork` with a
  `TanhNormalProjectionNetwork` and of `ActorPolicy`: the encoder's dense
  layers, a linear projection to [means, log stds], std = exp(log std), a
  sample x ~ N(mean, std), then action = mid + half_range * tanh(x), clipped
  to the action spec.
  """

  def __init__(self, encoder_layers, projection_layer, action_spec,
               seed: Optional[int] = None):
    self._network = networks.NumpyLayers(list(encoder_layers) +
                                       [projection_layer])
    self._shape = tuple(action_spec.shape)
    self._dtype = action_spec.dtype.as_numpy_dtype
    minimum = np.broadcast_to(np.asarray(action_spec.minimum, self._dtype),
                              self._shape)
    maximum = np.broadcast_to(np.asarray(action_spec.maximum, self._dtype),
                              self._shape)
    self._minimum, self._maximum = minimum, maximum
    # TF-Agents' spec_means_and_magnitudes.
    self._mid = ((maximum + minimum) / 2).astype(self._dtype)
    self._half_range = ((maximum - minimum) / 2).astype(self._dtype)
    self._rng = np.random.default_rng(seed)

  def refresh(self) -> None:
    self._network.refresh()

  def normal(self, observations: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Means and stds of the Gaussian before squashing, [B, *action shape]."""
    out = self._network(observations)
    means, log_stds = np.split(out, 2, axis=-1)
    with np.errstate(over='ignore'):  # inf, as in TF: the action is a bound.
      stds = np.exp(log_stds)
    shape = (-1,) + self._shape
    return (means.reshape(shape).astype(self._dtype, copy=False),
            stds.reshape(shape).astype(self._dtype, copy=False))

  def squash(self, x: np.ndarray) -> np.ndarray:
    action = np.tanh(x).astype(self._dtype, copy=False)
    action *= self._half_range
    action += self._mid
    # Clipped to the spec as TF-Agents' policies clip (np.clip costs more).
    np.minimum(action, self._maximum, out=action)
    np.maximum(action, self._minimum, out=action)
    return action

  def mode(self, observations: np.ndarray) -> np.ndarray:
    return self.squash(self.normal(observations)[0])

  def __call__(self, observations: np.ndarray) -> np.ndarray:
    means, stds = self.normal(observations)
    noise = self._rng.standard_normal(means.shape, dtype=np.float32)
    return self.squash(means + stds * noise.astype(self._dtype, copy=False))


def numpy_collect_policy(agent, config: SacConfig,
                         seed: Optional[int] = None):
  """`NumpyCollectPolicy` for `agent`, or None for networks it cannot run."""
  del config
  net = compat.actor_network_layers(agent)
  if net is None:
    return None
  layers = networks.encoder_layers(net.encoder)
  action_specs = tf.nest.flatten(agent.action_spec)
  if (layers is None or len(action_specs) != 1 or
      net.std_transform is not tf.exp or
      not networks.NumpyLayers.supports([net.projection_layer]) or
      agent.collect_policy.observation_and_action_constraint_splitter):
    return None
  return NumpyCollectPolicy(layers, net.projection_layer, action_specs[0],
                            seed)
