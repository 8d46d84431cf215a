"""An actor's environments, stepped together: in its own process or in subprocesses.

Both classes hold environments in groups that step independently: `send`
a group's actions, `wait` for groups that have finished, `receive` their
time steps (one per environment; each environment auto-resets after its
LAST step, as TF-Agents' `PyEnvironment` does). `InProcessEnvironments` is
one group, stepped in `receive`. `EnvironmentProcesses` runs one group per
subprocess (each stepping its environments in turn), so one actor with one
policy can keep several cores busy.

The subprocesses are started with 'spawn' (the actor has TensorFlow loaded,
which does not survive a fork), ignore SIGINT and SIGTERM (the actor stops
them when it has finished its step) and die with the actor: on the EOF of
their pipe and, on Linux, by a parent-death signal if it is killed. An
environment that raises in a subprocess ends the actor with one line naming
it.
"""

import multiprocessing
from multiprocessing import connection
import os
import signal
from typing import List, Sequence

import numpy as np

from common import environments
from common.errors import UserError

# How long a subprocess may take to load its environments.
_START_TIMEOUT_S = 300.0


def item(batch, i):
  """Element i of a batch: an array, a nest of arrays, or () (no info)."""
  if isinstance(batch, np.ndarray):
    return batch[i]
  if batch == ():  # pylint: disable=g-explicit-bool-comparison
    return ()
  # Here (not at the top): a subprocess imports TensorFlow only for nests.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.nest.map_structure(lambda x: x[i], batch)


def _load(env_name: str, seeds: Sequence[int],
          options: environments.EnvOptions):
  from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top
  return [wrappers.RunStats(environments.load_environment(
      env_name, seed=seed, options=options)) for seed in seeds]


class InProcessEnvironments:
  """Environments stepped one after another in the actor's own process."""

  def __init__(self, env_name: str, seeds: Sequence[int],
               options: environments.EnvOptions):
    self._envs = _load(env_name, seeds, options)
    self.batch_size = len(self._envs)
    self.num_groups = 1
    self._indices = list(range(self.batch_size))
    self._actions = None

  def time_step_spec(self):
    return self._envs[0].time_step_spec()

  def observation_spec(self):
    return self._envs[0].observation_spec()

  def action_spec(self):
    return self._envs[0].action_spec()

  def reset(self) -> List:
    return [env.reset() for env in self._envs]

  def group_indices(self, group: int) -> List[int]:
    del group
    return self._indices

  def send(self, group: int, actions) -> None:
    del group
    self._actions = actions

  def wait(self) -> List[int]:
    return [0]

  def receive(self, group: int) -> List:
    del group
    actions, self._actions = self._actions, None
    return [env.step(item(actions, i)) for i, env in enumerate(self._envs)]

  @property
  def episodes(self) -> int:
    return sum(env.episodes for env in self._envs)

  @property
  def resets(self) -> int:
    return sum(env.resets for env in self._envs)

  def close(self) -> None:
    for env in self._envs:
      env.close()


def _die_with_parent(parent_pid: int) -> None:
  """SIGKILL when the parent dies, however it dies (Linux); else EOF only."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    pr_set_pdeathsig = 1
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(pr_set_pdeathsig,
                                                   signal.SIGKILL)
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent_pid:  # Died before the signal was armed.
    os._exit(0)  # pylint: disable=protected-access


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())[:300]
  if isinstance(error, UserError):
    return text
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _serve(conn, parent_pid: int, env_name: str, seeds: Sequence[int],
           options: environments.EnvOptions) -> None:
  """A subprocess's loop: steps its environments for the actor."""
  _die_with_parent(parent_pid)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  try:
    envs = _load(env_name, seeds, options)
    env = envs[0]
    conn.send(('ready', (env.time_step_spec(), env.observation_spec(),
                         env.action_spec())))
    while True:
      try:
        message = conn.recv()
      except (EOFError, OSError):  # The actor is gone.
        return
      command, actions = message
      if command == 'step':
        steps = [e.step(item(actions, i)) for i, e in enumerate(envs)]
      elif command == 'reset':
        steps = [e.reset() for e in envs]
      else:  # close
        for e in envs:
          e.close()
        conn.send(('closed', None))
        return
      conn.send(('ok', (steps, sum(e.episodes for e in envs),
                        sum(e.resets for e in envs))))
  except (EOFError, OSError, BrokenPipeError):
    return
  except BaseException as e:  # pylint: disable=broad-except
    try:
      conn.send(('error', _one_line(e)))
    except (OSError, BrokenPipeError):
      pass
    os._exit(1)  # pylint: disable=protected-access


class EnvironmentProcesses:
  """`len(seeds_per_process)` subprocesses, each stepping its environments.

  Environment i of subprocess k has seed `seeds_per_process[k][i]`; the
  batch is ordered by subprocess, then environment.
  """

  def __init__(self, env_name: str, seeds_per_process: Sequence[Sequence[int]],
               options: environments.EnvOptions):
    context = multiprocessing.get_context('spawn')
    self._conns, self._procs, self._sizes = [], [], []
    self._episodes = [0] * len(seeds_per_process)
    self._resets = [0] * len(seeds_per_process)
    self._closed = False
    try:
      for seeds in seeds_per_process:
        ours, theirs = context.Pipe()
        proc = context.Process(
            target=_serve, args=(theirs, os.getpid(), env_name, list(seeds),
                                 options),
            name='env_process', daemon=True)
        proc.start()
        theirs.close()  # Only the child's copy: its death reads as EOF here.
        self._conns.append(ours)
        self._procs.append(proc)
        self._sizes.append(len(seeds))
      specs = [self._receive(k, 'ready', _START_TIMEOUT_S)
               for k in range(len(self._conns))]
    except BaseException:
      self._kill(grace_s=0)
      raise
    self._time_step_spec, self._observation_spec, self._action_spec = specs[0]
    self.batch_size = sum(self._sizes)
    self.num_groups = len(self._conns)
    offsets = np.cumsum([0] + self._sizes)
    self._indices = [list(range(offsets[k], offsets[k + 1]))
                     for k in range(self.num_groups)]
    self._pending = set()
    self._group_of = {conn: k for k, conn in enumerate(self._conns)}

  @property
  def pids(self) -> List[int]:
    return [proc.pid for proc in self._procs]

  def time_step_spec(self):
    return self._time_step_spec

  def observation_spec(self):
    return self._observation_spec

  def action_spec(self):
    return self._action_spec

  def _receive(self, k: int, expected: str, timeout_s: float = None):
    conn = self._conns[k]
    try:
      if timeout_s is not None and not conn.poll(timeout_s):
        raise UserError(f'environment subprocess {k} did not answer in '
                        f'{timeout_s:.0f}s')
      kind, payload = conn.recv()
    except (EOFError, OSError):
      self._procs[k].join(5)
      raise UserError(f'environment subprocess {k} (pid {self._procs[k].pid})'
                      f' exited unexpectedly with code '
                      f'{self._procs[k].exitcode}') from None
    if kind == 'error':
      raise UserError(f'environment in subprocess {k} failed: {payload}')
    if kind != expected:
      raise UserError(f'environment subprocess {k} answered {kind!r}, '
                      f'expected {expected!r}')
    return payload

  def group_indices(self, group: int) -> List[int]:
    """The batch positions of subprocess `group`'s environments."""
    return self._indices[group]

  def reset(self) -> List:
    for conn in self._conns:
      conn.send(('reset', None))
    time_steps = []
    for k in range(self.num_groups):
      steps, self._episodes[k], self._resets[k] = self._receive(k, 'ok')
      time_steps.extend(steps)
    return time_steps

  def send(self, group: int, actions) -> None:
    try:
      self._conns[group].send(('step', actions))
    except (OSError, BrokenPipeError):
      self._receive(group, 'ok')  # Raises with the subprocess's own reason.
    self._pending.add(group)

  def wait(self) -> List[int]:
    """The subprocesses that have finished stepping (at least one)."""
    ready = connection.wait([self._conns[k] for k in self._pending])
    return sorted(self._group_of[conn] for conn in ready)

  def receive(self, group: int) -> List:
    self._pending.discard(group)
    steps, self._episodes[group], self._resets[group] = self._receive(
        group, 'ok')
    return steps

  @property
  def episodes(self) -> int:
    return sum(self._episodes)

  @property
  def resets(self) -> int:
    return sum(self._resets)

  def close(self) -> None:
    """Asks every subprocess to close its environments, then reaps them."""
    if self._closed:
      return
    self._closed = True
    for conn in self._conns:
      try:
        conn.send(('close', None))
        # A step in flight answers first.
        while conn.poll(10) and conn.recv()[0] not in ('closed', 'error'):
          pass
      except (EOFError, OSError):
        pass
      conn.close()
    self._kill()

  def _kill(self, grace_s: float = 5.0) -> None:
    for proc in self._procs:
      proc.join(grace_s)
      if proc.is_alive():
        proc.kill()
        proc.join(5)
