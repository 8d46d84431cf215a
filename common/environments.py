"""Loads a TF-Agents py environment from a name.

A name is one of:
  * a PyBullet gym id (`MinitaurBulletEnv-v0`), loaded with `suite_pybullet`;
  * any other registered gym id (`Pendulum-v1`), loaded with `suite_gym`;
  * `package.module:factory`, a callable returning a `PyEnvironment` or a gym
    environment.
"""

import difflib
import functools
import importlib
import os
from typing import Optional

from common.config import EnvOptions
from common.errors import UserError
from common.errors import one_line


def _registered_gym_ids():
  import gym  # pylint: disable=g-import-not-at-top
  # Registering the PyBullet ids is a side effect of importing pybullet_envs.
  # tf_agents.environments stops importing its suites at suite_atari when
  # ale_py is missing, so the PyBullet suite is imported explicitly too.
  with open(os.devnull, 'w') as devnull, _redirect_stdout(devnull):
    import pybullet_envs  # pylint: disable=g-import-not-at-top,unused-import
  return gym.envs.registry


class _redirect_stdout:
  """Silences pybullet's 'pybullet build time' banner written to fd 1."""

  def __init__(self, target):
    self._target = target

  def __enter__(self):
    import sys  # pylint: disable=g-import-not-at-top
    sys.stdout.flush()
    self._saved = os.dup(1)
    os.dup2(self._target.fileno(), 1)

  def __exit__(self, *exc):
    os.dup2(self._saved, 1)
    os.close(self._saved)


def _load_factory(name: str):
  from tf_agents.environments import gym_wrapper  # pylint: disable=g-import-not-at-top
  from tf_agents.environments import py_environment  # pylint: disable=g-import-not-at-top
  module_name, _, attr = name.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f'--env={name}: cannot import module {module_name!r} ({e}); '
                    'expected --env=package.module:factory') from None
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise UserError(f'--env={name}: module {module_name!r} has no callable '
                    f'{attr!r}; expected --env=package.module:factory')
  try:
    env = factory()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'--env={name}: {attr}() raised {type(e).__name__}: '
                    f'{one_line(e, 200, whole=True)}') from None
  if isinstance(env, py_environment.PyEnvironment):
    return env
  import gym  # pylint: disable=g-import-not-at-top
  if isinstance(env, gym.Env):
    return gym_wrapper.GymWrapper(env)
  raise UserError(f'--env={name}: {attr}() returned {type(env).__name__}, '
                  'expected a tf_agents PyEnvironment or a gym.Env')


def load_environment(name: str, seed: Optional[int] = None,
                     options: EnvOptions = EnvOptions(),
                     bind_bullet_client: bool = True):
  """Returns the py environment called `name`, wrapped and validated.

  A PyBullet environment's client has its functions bound once
  (`compat.bind_bullet_client`: the same physics with less Python per step);
  `bind_bullet_client=False` keeps PyBullet's stock client (benchmarks).

  Raises:
    UserError: unknown name, a factory that fails, a wrapper that does not
      apply, or an environment whose time steps disagree with its specs.
  """
  env = _load(name, options.max_episode_steps, bind_bullet_client)
  if options.action_repeat > 1:
    from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top
    env = wrappers.ActionRepeat(env, options.action_repeat)
  if options.discretize_actions:
    env = _discretize(env, name, options.discretize_actions)
  if seed is not None:
    try:
      env.seed(seed)
    except (NotImplementedError, AttributeError):
      pass
  # Outermost, so that nothing a wrapper or the environment does after LAST
  # is ever seen: every LAST ends its episode.
  env = reset_after_last(env)
  if options.validate_episodes:
    validate(env, name, options.validate_episodes)
  return env


def reset_after_last(env):
  """`env`, reset by the step after every LAST, whatever `env` does then.

  TF-Agents' `PyEnvironment` does not reset after LAST unless it was built
  with `handle_auto_reset` (the environments tutorial's card game is not, and
  after a bust it draws on and returns LAST again). TF-Agents' drivers
  expect the step after LAST to be the next episode's FIRST (a boundary);
  this wrapper makes it so. The step after LAST calls `env.reset()` instead
  of `env.step()`, so an environment that resets itself (gym's, TimeLimit)
  is reset once, not twice, and the boundary is no environment step.
  """
  return _reset_after_last_class()(env)


@functools.lru_cache(maxsize=None)
def _reset_after_last_class():
  # Here, not at the top: the launcher reads EnvOptions without TF-Agents.
  from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top

  class ResetAfterLast(wrappers.PyEnvironmentBaseWrapper):
    """The base class's auto-reset: `step` after LAST calls `reset`."""

    def __init__(self, env):
      super().__init__(env, handle_auto_reset=True)

    # The base wrapper forwards only observation and action specs.
    def reward_spec(self):
      return self.wrapped_env().reward_spec()

    def discount_spec(self):
      return self.wrapped_env().discount_spec()

  return ResetAfterLast


def _discretize(env, name: str, num_actions: int):
  from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top
  if num_actions < 2:
    raise UserError(f'--discretize_actions={num_actions}: need at least 2')
  try:
    return wrappers.ActionDiscretizeWrapper(env, num_actions=num_actions)
  except (ValueError, TypeError, AttributeError) as e:
    raise UserError(f'--discretize_actions does not apply to --env={name} '
                    f'({one_line(e, 150)}); it needs bounded '
                    'continuous actions') from None


def validate(env, name: str, episodes: int, max_steps: int = 100000) -> None:
  """Random-action episodes; every time step must match the specs.

  Checks structure, shapes and dtypes as TF-Agents' validate_py_environment
  does, but not the bounds of observations: real simulators overshoot them
  now and then (Minitaur's motor angles pass pi + 0.01), which is no reason
  to refuse them. Raises one UserError line if a check fails.
  """
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import tensorflow as tf
  from tf_agents.policies import random_py_policy
  from tf_agents.specs import array_spec
  # pylint: enable=g-import-not-at-top

  def unbounded(spec):
    return array_spec.ArraySpec(spec.shape, spec.dtype, spec.name)

  try:
    time_step_spec = env.time_step_spec()
    relaxed = time_step_spec._replace(observation=tf.nest.map_structure(
        unbounded, time_step_spec.observation))
    policy = random_py_policy.RandomPyPolicy(time_step_spec, env.action_spec())
    done, steps = 0, 0
    time_step = env.reset()
    while done < episodes and steps < max_steps:
      if not array_spec.check_arrays_nest(time_step, relaxed):
        got = tf.nest.map_structure(
            lambda x: f'{np.asarray(x).dtype}{list(np.shape(x))}', time_step)
        want = tf.nest.map_structure(
            lambda s: f'{np.dtype(s.dtype)}{list(s.shape)}', relaxed)
        raise ValueError(f'time step {got} does not match the spec {want}')
      if time_step.is_last():
        done += 1
        time_step = env.reset()
      else:
        time_step = env.step(policy.action(time_step).action)
      steps += 1
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = one_line(e, 400, whole=True)
    raise UserError(f'--env={name} failed validation over {episodes} '
                    f'episode(s): {reason}') from None


def _load(name: str, max_episode_steps: int, bind_bullet_client: bool):
  """The bare environment for `name`, with TimeLimit `max_episode_steps`."""
  if not name:
    raise UserError('--env is empty: give a gym/PyBullet id such as '
                    'MinitaurBulletEnv-v0 or package.module:factory')
  if ':' in name:
    env = _load_factory(name)
    if max_episode_steps:
      from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top
      env = wrappers.TimeLimit(env, max_episode_steps)
  else:
    registry = _registered_gym_ids()
    ids = list(registry.keys()) if hasattr(registry, 'keys') else [
        s.id for s in registry.all()]
    if name not in ids:
      close = difflib.get_close_matches(name, ids, n=3)
      hint = f'; did you mean {", ".join(close)}?' if close else (
          '; give a gym/PyBullet id or package.module:factory')
      raise UserError(f'unknown environment --env={name!r}{hint}')
    spec = registry[name] if hasattr(registry, 'keys') else registry.spec(name)
    entry_point = str(getattr(spec, 'entry_point', ''))
    if 'pybullet' in entry_point:
      from tf_agents.environments import suite_pybullet  # pylint: disable=g-import-not-at-top
      with open(os.devnull, 'w') as devnull, _redirect_stdout(devnull):
        env = suite_pybullet.load(name, max_episode_steps=max_episode_steps or
                                  None)
      if bind_bullet_client:
        from common import compat  # pylint: disable=g-import-not-at-top
        compat.bind_bullet_client(env.gym.unwrapped)
    else:
      from tf_agents.environments import suite_gym  # pylint: disable=g-import-not-at-top
      env = suite_gym.load(name, max_episode_steps=max_episode_steps or None)
  return env


def control_rate_hz(env, action_repeat: int = 1) -> Optional[float]:
  """Agent steps per second of simulated time, or None when `env` says not.

  The period of one agent step is the environment's own step period times
  `action_repeat` (TF-Agents' ActionRepeat wrapper, --action_repeat). The
  environment's period is found on the innermost gym environment: PyBullet's
  Minitaur `_time_step * _action_repeat` (0.01 s x 1), `dt` (Pendulum 0.05 s,
  MuJoCo), `tau` (CartPole 0.02 s), else its metadata's frame rate. A
  PyEnvironment with none of these (a custom one) has no known rate.
  """
  inner = env
  for _ in range(64):  # Down the wrappers to the gym environment.
    if hasattr(inner, 'gym'):
      inner = inner.gym
      break
    if not hasattr(inner, 'wrapped_env'):
      break
    inner = inner.wrapped_env()
  inner = getattr(inner, 'unwrapped', inner)
  period = None
  time_step = getattr(inner, '_time_step', None)
  if isinstance(time_step, (int, float)) and time_step > 0:
    period = time_step * getattr(inner, '_action_repeat', 1)
  for name in ('dt', 'tau'):
    value = getattr(inner, name, None)
    if period is None and isinstance(value, (int, float)) and value > 0:
      period = float(value)
  if period is None:
    metadata = getattr(inner, 'metadata', None) or {}
    fps = metadata.get('render_fps') or metadata.get('video.frames_per_second')
    if isinstance(fps, (int, float)) and fps > 0:
      period = 1.0 / fps
  if period is None:
    return None
  return 1.0 / (period * max(1, action_repeat))


def set_render_size(width: int, height: int) -> None:
  """Sets the frame size PyBullet's Minitaur renders at.

  Minitaur renders 960x720 frames (module constants, no argument) with the
  software renderer, about 3 frames/s on a CPU; frame time scales with pixels.
  """
  try:
    from pybullet_envs.bullet import minitaur_gym_env  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  minitaur_gym_env.RENDER_WIDTH = width
  minitaur_gym_env.RENDER_HEIGHT = height
