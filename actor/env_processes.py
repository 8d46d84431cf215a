"""An actor's environments, stepped together: in its own process or in subprocesses.

Both classes hold environments in groups that step independently: `send`
a group's actions, `wait` for groups that have finished, `receive` their
time steps (one per environment; each environment is reset by the step
after its LAST, whatever the environment itself does then:
`common.environments.reset_after_last`). `InProcessEnvironments` is
one group, stepped in `receive`. `EnvironmentProcesses` runs one group per
subprocess (each stepping its environments in turn), so one actor with one
policy can keep several cores busy.

The subprocesses are started with 'spawn' (the actor has TensorFlow loaded,
which does not survive a fork), ignore SIGINT and SIGTERM (the actor stops
them when it has finished its step) and die with the actor: on the EOF of
their pipe and, on Linux, by a parent-death signal if it is killed. An
environment that raises in a subprocess ends the actor with one line naming
it.

A step or reset that takes longer than `step_timeout_s` (a hung simulator)
ends the actor with one line naming the environment and the timeout, exit
code 2: a subprocess's is killed and raised as a UserError; one in this
process cannot be interrupted, so a watchdog thread ends the process
(`StepWatchdog`).
"""

import contextlib
import multiprocessing
from multiprocessing import connection
import os
import signal
import threading
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from common import config as config_lib
from common import environments
from common import errors
from common import process
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
          options: config_lib.EnvOptions):
  from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top
  return [wrappers.RunStats(environments.load_environment(
      env_name, seed=seed, options=options)) for seed in seeds]


def _timeout_message(env_name: str, what: str, timeout_s: float,
                     where: str = '') -> str:
  return (f'environment {env_name}{where}: a {what} took longer than '
          f'--env_step_timeout_s={timeout_s:g}s (hung?); fix the environment '
          'or raise --env_step_timeout_s')


class StepWatchdog:
  """Ends the process when an environment call in it outlasts `timeout_s`.

  A step in this process cannot be interrupted (it may be stuck in C code),
  so a thread watches the call in progress and, past the timeout, calls
  `on_timeout(message)`: by default one line and exit code 2
  (`process.exit_with_error`), as a UserError would end the process.
  """

  def __init__(self, env_name: str, timeout_s: float,
               on_timeout: Callable[[str], None] = process.exit_with_error):
    self._env_name = env_name
    self._timeout_s = timeout_s
    self._on_timeout = on_timeout
    self._busy = None  # (what, since) of the call in progress.
    self._thread = None

  @contextlib.contextmanager
  def guard(self, what: str):
    if self._thread is None:
      self._thread = threading.Thread(target=self._watch, daemon=True,
                                      name='env-step-watchdog')
      self._thread.start()
    self._busy = (what, time.monotonic())
    try:
      yield
    finally:
      self._busy = None

  def _watch(self) -> None:
    while True:
      time.sleep(min(1.0, self._timeout_s / 4))
      busy = self._busy
      if busy is not None and time.monotonic() - busy[1] > self._timeout_s:
        self._on_timeout(_timeout_message(self._env_name, busy[0],
                                          self._timeout_s))
        return


def watched(env, watchdog: StepWatchdog):
  """`env` with each step and reset under `watchdog`."""
  from tf_agents.environments import wrappers  # pylint: disable=g-import-not-at-top

  class Watched(wrappers.PyEnvironmentBaseWrapper):

    def _reset(self):
      with watchdog.guard('reset'):
        return self._env.reset()

    def _step(self, action):
      with watchdog.guard('step'):
        return self._env.step(action)

  return Watched(env)


class InProcessEnvironments:
  """Environments stepped one after another in the actor's own process."""

  def __init__(self, env_name: str, seeds: Sequence[int],
               options: config_lib.EnvOptions,
               step_timeout_s: Optional[float] = None):
    self._envs = _load(env_name, seeds, options)
    if step_timeout_s:
      watchdog = StepWatchdog(env_name, step_timeout_s)
      self._envs = [watched(env, watchdog) for env in self._envs]
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


def _failure(error: BaseException) -> str:
  """What the actor prints for a subprocess's failure: the error's type
  (a UserError's message speaks for itself) and its one line."""
  text = errors.one_line(error, limit=300)
  if isinstance(error, UserError) or text == type(error).__name__:
    return text
  return f'{type(error).__name__}: {text}'


def _serve(conn, parent_pid: int, env_name: str, seeds: Sequence[int],
           options: config_lib.EnvOptions) -> None:
  """A subprocess's loop: steps its environments for the actor."""
  # Dies with the actor however it dies (Linux; elsewhere on the pipe's EOF);
  # SIGKILL, as this process ignores SIGTERM.
  process.die_with_parent(signal.SIGKILL)
  if os.getppid() != parent_pid:  # The actor died before that was armed.
    os._exit(0)  # pylint: disable=protected-access
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
      conn.send(('error', _failure(e)))
    except (OSError, BrokenPipeError):
      pass
    os._exit(1)  # pylint: disable=protected-access


class EnvironmentProcesses:
  """`len(seeds_per_process)` subprocesses, each stepping its environments.

  Environment i of subprocess k has seed `seeds_per_process[k][i]`; the
  batch is ordered by subprocess, then environment.
  """

  def __init__(self, env_name: str, seeds_per_process: Sequence[Sequence[int]],
               options: config_lib.EnvOptions,
               step_timeout_s: Optional[float] = None):
    context = multiprocessing.get_context('spawn')
    self._env_name = env_name
    self._step_timeout_s = step_timeout_s
    self._sent_at = {}  # group -> when its step was sent.
    self._conns, self._procs, self._sizes = [], [], []
    self._episodes = [0] * len(seeds_per_process)
    self._resets = [0] * len(seeds_per_process)
    self._closed = False
    self._hung = set()
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

  def _receive(self, k: int, expected: str, timeout_s: float = None,
               what: str = ''):
    """Subprocess k's answer; with `what` ('step', 'reset'), `timeout_s` is
    --env_step_timeout_s: past it the subprocess is killed."""
    conn = self._conns[k]
    try:
      if timeout_s is not None and not conn.poll(max(0.0, timeout_s)):
        if what:
          self._kill_hung(k)
          raise UserError(_timeout_message(
              self._env_name, what, self._step_timeout_s,
              f' in subprocess {k}'))
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

  def _left_s(self, group: int) -> Optional[float]:
    """Seconds left of group's step timeout (None: no timeout)."""
    if not self._step_timeout_s:
      return None
    return self._sent_at[group] + self._step_timeout_s - time.monotonic()

  def reset(self) -> List:
    now = time.monotonic()
    for k, conn in enumerate(self._conns):
      conn.send(('reset', None))
      self._sent_at[k] = now
    time_steps = []
    for k in range(self.num_groups):
      steps, self._episodes[k], self._resets[k] = self._receive(
          k, 'ok', self._left_s(k), 'reset')
      time_steps.extend(steps)
    return time_steps

  def send(self, group: int, actions) -> None:
    try:
      self._conns[group].send(('step', actions))
    except (OSError, BrokenPipeError):
      self._receive(group, 'ok')  # Raises with the subprocess's own reason.
    self._sent_at[group] = time.monotonic()
    self._pending.add(group)

  def wait(self) -> List[int]:
    """The subprocesses that have finished stepping (at least one)."""
    while True:
      timeout = None
      if self._step_timeout_s:
        late = min(self._pending, key=self._left_s)
        timeout = max(0.0, self._left_s(late))
      ready = connection.wait([self._conns[k] for k in self._pending],
                              timeout)
      if ready:
        return sorted(self._group_of[conn] for conn in ready)
      if self._step_timeout_s and self._left_s(late) <= 0:
        self._receive(late, 'ok', 0.0, 'step')  # Raises: it is hung.

  def receive(self, group: int) -> List:
    self._pending.discard(group)
    steps, self._episodes[group], self._resets[group] = self._receive(
        group, 'ok', self._left_s(group), 'step')
    return steps

  def _kill_hung(self, k: int) -> None:
    """A hung subprocess gets no chance to close: killed at once."""
    self._hung.add(k)
    self._procs[k].kill()

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
    for k, conn in enumerate(self._conns):
      if k in self._hung:
        conn.close()
        continue
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
