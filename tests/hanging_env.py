"""An environment whose `step` blocks for good after a few steps (a hung
simulator), for the actor's --env_step_timeout_s and stop deadline."""

import threading

import numpy as np
from tf_agents.environments import py_environment
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

STEPS_BEFORE_HANG = 30


class HangingEnv(py_environment.PyEnvironment):
  """Ten-step episodes of a 1-D continuous task; hangs at step 30."""

  def __init__(self):
    super().__init__()
    self._steps = 0
    self._t = 0

  def action_spec(self):
    return array_spec.BoundedArraySpec((1,), np.float32, -1.0, 1.0, 'action')

  def observation_spec(self):
    return array_spec.ArraySpec((2,), np.float32, 'observation')

  def _observation(self):
    return np.array([self._t, 1.0], np.float32)

  def _reset(self):
    self._t = 0
    return ts.restart(self._observation())

  def _step(self, action):
    self._steps += 1
    if self._steps > STEPS_BEFORE_HANG:
      threading.Event().wait()  # Forever, as a deadlocked simulator.
    self._t += 1
    if self._t >= 10:
      return ts.termination(self._observation(), 1.0)
    return ts.transition(self._observation(), 1.0)
