"""Stepping a batch of environments: time step -> action -> environments -> observers.

Owns `Collector` (steps the batch and hands environment i's trajectories to
observer i: the Reverb writers, or the tests' recorders), the ways to act
(`numpy_act`, `random_act`, `tf_act`) and the collect metrics
(`EpisodeStats`). The collecting actor's main loop is `actor.collect`.

TF-Agents' `Actor`/`PyDriver` does the same with nests, metrics and a
`tf.function` call per step, which cost a third of the time of one
environment step on Minitaur. This loop keeps their semantics (each
environment's trajectory is `trajectory.from_transition(time_step,
action_step, next_time_step)`, handed to that environment's Reverb
observer; LAST -> FIRST boundaries included; steps counted without
boundaries) and does only what it must per step.
"""

import collections
from typing import Callable, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tf_agents.policies import py_tf_eager_policy
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories import trajectory
from tf_agents.utils import nest_utils

from actor.env_processes import item

# act(time_steps) -> (batch of actions, batch of policy infos or ()).
Act = Callable[[Sequence[ts.TimeStep]], Tuple[object, object]]

_LAST = ts.StepType.LAST
_FIRST = ts.StepType.FIRST


def _observations(time_steps: Sequence[ts.TimeStep]) -> np.ndarray:
  if len(time_steps) == 1:
    return np.asarray(time_steps[0].observation)[None]
  return np.stack([t.observation for t in time_steps])


def numpy_act(policy) -> Act:
  """Acts with a NumPy policy (`common.agents.numpy_collect_policy`)."""
  return lambda time_steps: (policy(_observations(time_steps)), ())


def random_act(action_spec, seed=None) -> Act:
  """Uniform random actions, as TF-Agents' `RandomPyPolicy` samples them."""
  rng = np.random.RandomState(seed)
  return lambda time_steps: (array_spec.sample_spec_nest(
      action_spec, rng, outer_dims=(len(time_steps),)), ())


def tf_act(policy) -> Act:
  """Acts with a TF policy (agents without a NumPy collect policy)."""
  py_policy = py_tf_eager_policy.PyTFEagerPolicy(
      policy, use_tf_function=True, batch_time_steps=False)
  to_numpy = lambda t: t.numpy() if hasattr(t, 'numpy') else t

  def act(time_steps):
    step = py_policy.action(nest_utils.stack_nested_arrays(list(time_steps)))
    # Numpy for the environments (Minitaur cannot take tensors).
    return (tf.nest.map_structure(to_numpy, step.action),
            tf.nest.map_structure(to_numpy, step.info))

  return act


def _slice(batch, start, stop):
  if isinstance(batch, np.ndarray):
    return batch[start:stop]
  if batch == ():  # pylint: disable=g-explicit-bool-comparison
    return ()
  return tf.nest.map_structure(lambda x: x[start:stop], batch)


class EpisodeStats:
  """TF-Agents' collect metrics: episodes, env steps, average return and
  episode length over the last `buffer_size` episodes."""

  def __init__(self, batch_size: int, buffer_size: int = 10):
    self.episodes = 0
    self.env_steps = 0
    self._returns = [0.0] * batch_size
    self._lengths = [0] * batch_size
    self._last_returns = collections.deque(maxlen=buffer_size)
    self._last_lengths = collections.deque(maxlen=buffer_size)

  def observe(self, i: int, step_type, reward, next_step_type) -> None:
    """Environment i's trajectory (a boundary LAST -> FIRST counts nothing)."""
    if step_type == _LAST:
      return
    if step_type == _FIRST:
      self._returns[i], self._lengths[i] = 0.0, 0
    self._returns[i] += float(reward)
    self._lengths[i] += 1
    self.env_steps += 1
    if next_step_type == _LAST:
      self.episodes += 1
      self._last_returns.append(self._returns[i])
      self._last_lengths.append(self._lengths[i])

  @property
  def average_return(self) -> float:
    return float(np.mean(self._last_returns)) if self._last_returns else 0.0

  @property
  def average_episode_length(self) -> float:
    return float(np.mean(self._last_lengths)) if self._last_lengths else 0.0

  def write_summaries(self, step: int) -> None:
    """As TF-Agents' `Actor.write_metric_summaries` names them."""
    tf.summary.scalar('Metrics/NumberOfEpisodes', self.episodes, step=step)
    tf.summary.scalar('Metrics/EnvironmentSteps', self.env_steps, step=step)
    tf.summary.scalar('Metrics/AverageReturn', self.average_return, step=step)
    tf.summary.scalar('Metrics/AverageEpisodeLength',
                      self.average_episode_length, step=step)


class Collector:
  """Steps environments and writes environment i's trajectories with
  `observers[i]`.

  `envs` comes in groups (one per environment subprocess; one group in
  process) that step independently: a group's next actions are computed and
  sent as soon as its time steps arrive, one policy call for all groups
  that are ready together, so a subprocess that resets (Minitaur: ~25 env
  steps' time) holds up no other. Its trajectories are written while it
  steps. Keeps the current time steps and the actions in flight between
  `run` calls, as TF-Agents' `Actor` keeps its time step.
  """

  def __init__(self, envs, observers: Sequence[Callable]):
    if len(observers) != envs.batch_size:
      raise ValueError(f'{len(observers)} observers for {envs.batch_size} '
                       'environments')
    self._envs = envs
    self._observers = list(observers)
    self._time_steps = None  # Per environment.
    self._in_flight = {}  # group -> (actions, infos) being stepped.
    self.env_steps = 0  # Without boundaries, as TF-Agents counts them.

  def reset(self) -> None:
    """New episodes from the next `run` on (actions in flight are dropped)."""
    for group in list(self._in_flight):
      self._envs.receive(group)
    self._in_flight.clear()
    self._time_steps = None

  def _send(self, act: Act, groups: Sequence[int]) -> None:
    envs = self._envs
    time_steps = [self._time_steps[i] for g in groups
                  for i in envs.group_indices(g)]
    actions, infos = act(time_steps)
    start = 0
    for g in groups:
      size = len(envs.group_indices(g))
      part = (_slice(actions, start, start + size),
              _slice(infos, start, start + size))
      envs.send(g, part[0])
      self._in_flight[g] = part
      start += size

  def run(self, act: Act, max_steps: int, stats: EpisodeStats = None) -> int:
    """At least `max_steps` env steps (all environments), as `PyDriver`."""
    envs = self._envs
    if self._time_steps is None:
      self._time_steps = envs.reset()
      self._send(act, range(envs.num_groups))
    time_steps = self._time_steps
    observers = self._observers
    steps = 0
    while steps < max_steps:
      ready = envs.wait()
      done = [(g, envs.receive(g), self._in_flight.pop(g)) for g in ready]
      # What they just did, against the time steps they started from.
      previous = []
      for g, next_steps, _ in done:
        for i, next_step in zip(envs.group_indices(g), next_steps):
          previous.append(time_steps[i])
          time_steps[i] = next_step
      # Their next actions first: the subprocesses step while we write.
      self._send(act, ready)
      k = 0
      for g, next_steps, (actions, infos) in done:
        for j, (i, next_step) in enumerate(zip(envs.group_indices(g),
                                               next_steps)):
          time_step = previous[k]
          k += 1
          # trajectory.from_transition, without its PolicyStep.
          observers[i](trajectory.Trajectory(
              step_type=time_step.step_type,
              observation=time_step.observation,
              action=item(actions, j),
              policy_info=item(infos, j),
              next_step_type=next_step.step_type,
              reward=next_step.reward,
              discount=next_step.discount))
          if time_step.step_type != _LAST:
            steps += 1
          if stats is not None:
            stats.observe(i, time_step.step_type, next_step.reward,
                          next_step.step_type)
    self.env_steps += steps
    return steps


def single_threaded_blas() -> bool:
  """Makes NumPy's OpenBLAS run matrix products in the calling thread.

  The collect policy's products are tiny; with more BLAS threads, each call
  between two environment steps wakes sleeping helper threads, which cost
  more than the product (and on a busy machine, a lot more). The thread
  count is usually fixed when NumPy loads (OPENBLAS_NUM_THREADS), which the
  actor is past; OpenBLAS's own setter still works (threadpoolctl does the
  same). Returns whether it found the setter.
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  libs = os.path.join(os.path.dirname(np.__file__), os.pardir, 'numpy.libs')
  found = False
  for path in glob.glob(os.path.join(libs, 'libopenblas*.so*')):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for name in ('openblas_set_num_threads64_', 'openblas_set_num_threads'):
      setter = getattr(lib, name, None)
      if setter is not None:
        setter(1)
        found = True
        break
  return found
