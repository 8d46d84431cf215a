"""The card game of the TF-Agents environments tutorial, as a custom PyEnvironment.

Each step the agent either draws a card (action 1, a value 1..10 added to its
sum) or stops (action 0). Stopping ends the episode with reward `sum - 21` if
the sum is at most 21, else -21; going over 21 also ends it with -21.

Train it with the distributed system:
  python -m launcher --env=common.card_game:CardGameEnv --agent=dqn
"""

import numpy as np
from tf_agents.environments import py_environment
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

_MAX_SUM = 21


class CardGameEnv(py_environment.PyEnvironment):
  """Draw (1) or stop (0); the observation is the current sum of the cards."""

  def __init__(self, seed=None):
    super().__init__()
    self._action_spec = array_spec.BoundedArraySpec(
        shape=(), dtype=np.int32, minimum=0, maximum=1, name='action')
    self._observation_spec = array_spec.BoundedArraySpec(
        shape=(1,), dtype=np.int32, minimum=0, name='observation')
    self._rng = np.random.default_rng(seed)
    self._state = 0
    self._episode_ended = False

  def action_spec(self):
    return self._action_spec

  def observation_spec(self):
    return self._observation_spec

  def seed(self, seed):
    self._rng = np.random.default_rng(seed)

  def _observation(self):
    return np.array([self._state], dtype=np.int32)

  def _reset(self):
    self._state = 0
    self._episode_ended = False
    return ts.restart(self._observation())

  def _step(self, action):
    if self._episode_ended:
      # The last action ended the episode: start a new one.
      return self.reset()
    if action == 1:
      self._state += int(self._rng.integers(1, 11))
    elif action != 0:
      raise ValueError('`action` should be 0 (stop) or 1 (draw).')
    if action == 0 or self._state >= _MAX_SUM:
      self._episode_ended = True
      reward = self._state - _MAX_SUM if self._state <= _MAX_SUM else -_MAX_SUM
      return ts.termination(self._observation(), reward)
    return ts.transition(self._observation(), reward=0.0, discount=1.0)


class BrokenObservationEnv(CardGameEnv):
  """The card game with a bug: observations are float64, the spec says int32.

  Exists to show (and test) that every process rejects such an environment
  at start, naming the mismatch.
  """

  def _observation(self):
    return np.array([self._state], dtype=np.float64)
