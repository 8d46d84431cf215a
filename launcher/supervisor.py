"""Starts and watches a whole cluster on one machine.

Owns the child processes: starts the replay server, the learner, the actors
and the evaluator with the same flags, echoes their log lines prefixed with
their role, prints one progress line (launcher/progress_line.py: from status
data, never log text), restarts dead actors (with backoff, up to a number of
consecutive failures), stops the run when no actor is left to collect, and
shuts every child down on SIGINT/SIGTERM, in order, each group with its own
grace. The learner and the server are never restarted silently: if either
fails, the run fails.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Mapping, Optional, Sequence

from common import process
from common.errors import one_line
from launcher import progress_line

# Kinds of child, in the order they are stopped. The learner goes first,
# while actors still feed it, so it checkpoints at once; the servers go last,
# once nobody talks to them, and write their checkpoint on stop.
KINDS = ('learner', 'actor', 'evaluator', 'replay_server')
_STOP_ORDER = (('learner',), ('actor', 'evaluator'), ('replay_server',))
# Seconds each kind has between SIGTERM and SIGKILL. Each group's clock starts
# when that group is asked to stop, so a slow learner never eats the time of
# the server's final checkpoint.
DEFAULT_STOP_GRACE_S = {'learner': 60.0, 'actor': 20.0, 'evaluator': 20.0,
                        'replay_server': 60.0}
# The longest wait before restarting an actor, however often it failed.
MAX_RESTART_BACKOFF_S = 60.0
# Actors that exited 0 think training is over (or reached --max_train_steps);
# a learner still training this long after the last of them went starves.
_COLLECTORS_FINISHED_GRACE_S = 60.0
# Actors or evaluator still running this long after the learner finished are
# stopped.
_FINISHED_GRACE_S = 300.0


def _is_replay_server_name(role: str) -> bool:
  """replay_server, or replay_server_<shard> (the launcher's names)."""
  shard = role[len('replay_server_'):]
  return role == 'replay_server' or (
      role.startswith('replay_server_') and shard.isdigit())


@dataclasses.dataclass
class Child:
  """One child process and what the supervisor knows of it.

  `kind` is one of KINDS; empty, it follows from `module` or `role` (any
  other child is a collector, an actor, unless its role is `evaluator`).
  """
  role: str
  module: str
  args: List[str]
  restartable: bool = False
  kind: str = ''
  # Members of one group (the workers of a multi-worker learner) live and
  # die together: one that dies restarts them all.
  group: str = ''
  proc: Optional[subprocess.Popen] = None
  restarts: int = 0  # All restarts so far.
  failures: int = 0  # Consecutive deaths, reset after a healthy run.
  started_at: float = 0.0
  restart_at: Optional[float] = None  # When a pending restart is due.
  done: bool = False  # Exited and is not to be restarted.
  end: str = ''  # Why it is done, for the launcher's last word on it.

  def __post_init__(self):
    if not self.kind:
      if (self.module == 'replay_server' or
          _is_replay_server_name(self.role)):
        self.kind = 'replay_server'
      elif 'learner' in (self.module, self.role):
        self.kind = 'learner'
      else:
        self.kind = 'evaluator' if self.role == 'evaluator' else 'actor'
    if self.kind not in KINDS:
      raise ValueError(f'Child {self.role}: kind {self.kind!r} is not one of '
                       f'{KINDS}')


class Supervisor:
  """Runs the children; `run()` returns the launcher's exit code.

  A dead actor is restarted after `restart_backoff_s`, doubled with every
  consecutive failure (at most MAX_RESTART_BACKOFF_S), until it has failed
  `max_restarts` + 1 times in a row; a run of `healthy_after_s` resets its
  count. `stop_grace_s` maps a kind to its seconds between SIGTERM and
  SIGKILL at shutdown (missing kinds: DEFAULT_STOP_GRACE_S).
  `replay_addresses` are where the progress line reads the cluster's status
  (none: the line shows zeros).
  """

  def __init__(self, children: List[Child], log_dir: str, train_steps: int,
               show_child_logs: bool = True,
               progress_interval_s: float = 10.0, max_restarts: int = 5,
               restart_backoff_s: float = 2.0, healthy_after_s: float = 60.0,
               stop_grace_s: Optional[Mapping[str, float]] = None, out=None,
               replay_addresses: Sequence[str] = ()):
    self.children = children
    self.log_dir = log_dir
    self.train_steps = train_steps
    self.show_child_logs = show_child_logs
    self.progress_interval_s = progress_interval_s
    self.max_restarts = max_restarts
    self.restart_backoff_s = restart_backoff_s
    self.healthy_after_s = healthy_after_s
    self.stop_grace_s = dict(DEFAULT_STOP_GRACE_S, **(stop_grace_s or {}))
    self._out = out or sys.stdout
    self._print_lock = threading.Lock()
    self._reported = set()
    self._stop = threading.Event()
    self._stop_reason = None
    self.progress = progress_line.ProgressLine(
        train_steps, replay_addresses, window_s=progress_interval_s,
        report=lambda text: self._report_once('status_feed', text))
    self._start_time = time.monotonic()
    self._exit_code = 0
    self._learner_done: Optional[float] = None  # When it exited 0.
    self._collectors_gone: Optional[float] = None  # When the last one went.

  # --- output
  def _report_once(self, key, text: str) -> None:
    """One line on the launcher's stderr, the first time `key` comes up."""
    with self._print_lock:
      if key in self._reported:
        return
      self._reported.add(key)
    try:
      sys.stderr.write(text + '\n')
      sys.stderr.flush()
    except Exception:  # pylint: disable=broad-except
      pass  # Nowhere left to say it; the children must go on regardless.

  def say(self, text: str) -> None:
    try:
      with self._print_lock:
        self._out.write(text + '\n')
        self._out.flush()
    except Exception as e:  # pylint: disable=broad-except
      # A closed or full stdout must neither stop the supervisor nor, from a
      # log pump, leave a child blocked on a full pipe.
      self._report_once('out', '[launcher] error: cannot write to its output '
                        f'({one_line(e)}); its lines are dropped from there, '
                        f'the child logs in {self.log_dir} go on')

  def progress_line(self) -> str:
    collecting = sum(1 for c in self.children if c.kind == 'actor' and
                     not c.done and c.restart_at is None)
    return self.progress.line(collecting, time.monotonic() - self._start_time)

  def _pump(self, child: Child, proc: subprocess.Popen) -> None:
    """Drains the child's output into its log file and the launcher's output.

    Runs until the child's pipe closes, whatever fails: a pump that stopped
    would let the pipe fill (64 KiB) and block the child in its next log
    call. A failing write (a full disk, a closed stdout) is reported once and
    its line dropped there; every later line is tried again, so the log goes
    on once there is space.
    """
    path = os.path.join(self.log_dir, f'{child.role}.log')
    log, next_open = None, 0.0
    for raw in proc.stdout:
      try:
        if log is None and time.monotonic() >= next_open:
          try:
            log = open(path, 'ab', buffering=0)
          except OSError as e:
            next_open = time.monotonic() + 1.0
            self._report_once(path, f'[launcher] error: cannot open {path} '
                              f'({one_line(e)}); {child.role} log lines are '
                              'dropped there until it opens')
        if log is not None:
          try:
            log.write(raw if raw.endswith(b'\n') else raw + b'\n')
          except Exception as e:  # pylint: disable=broad-except
            self._report_once(path, f'[launcher] error: cannot write {path} '
                              f'({one_line(e)}); {child.role} log lines are '
                              'dropped there until writes succeed again')
        if self.show_child_logs:
          line = raw.decode('utf-8', errors='replace').rstrip('\n')
          self.say(f'[{child.role}] {line}')
      except Exception as e:  # pylint: disable=broad-except
        self._report_once(('pump', child.role), '[launcher] error: reading '
                          f'{child.role} output failed ({one_line(e)}); '
                          'dropping its lines, still draining them')
    if log is not None:
      try:
        log.close()
      except OSError:
        pass

  # --- processes
  def _spawn(self, child: Child) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    child.proc = subprocess.Popen(
        [sys.executable, '-m', child.module] + child.args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        # Own process group: a terminal's Ctrl-C reaches the launcher only,
        # which then stops the children in order.
        start_new_session=True, preexec_fn=process.die_with_parent)
    child.started_at = time.monotonic()
    threading.Thread(target=self._pump, args=(child, child.proc),
                     daemon=True).start()

  def restart_delay_s(self, failures: int) -> float:
    """Seconds before the restart after `failures` consecutive failures."""
    return min(MAX_RESTART_BACKOFF_S,
               self.restart_backoff_s * 2 ** max(0, failures - 1))

  def request_stop(self, reason: str) -> None:
    if not self._stop.is_set():
      self._stop_reason = reason
      self._stop.set()

  def _fail(self, reason: str) -> None:
    """The run ends with exit 1, for `reason`."""
    self._exit_code = 1
    self.request_stop(reason)

  def _install_signals(self):
    def handler(signum, _frame):
      if self._stop.is_set():
        self.say('[launcher] second signal: killing every child now')
        for c in self.children:
          if c.proc and c.proc.poll() is None:
            os.killpg(c.proc.pid, signal.SIGKILL)
        os._exit(130)  # pylint: disable=protected-access
      self.request_stop(f'{signal.Signals(signum).name} received')
    return {sig: signal.signal(sig, handler)
            for sig in (signal.SIGINT, signal.SIGTERM)}

  def shutdown(self) -> None:
    """SIGTERM the children group by group, SIGKILL whoever outstays its grace.

    Each group (learner; actors and evaluator; replay servers) gets its own
    `stop_grace_s`, counted from its own SIGTERM.
    """
    for kinds in _STOP_ORDER:
      if 'replay_server' in kinds:
        # The learner's last status, read while the servers still serve it.
        self.progress.refresh()
      self._stop_group(kinds)

  def _stop_group(self, kinds: Sequence[str]) -> None:
    members = [c for c in self.children
               if c.kind in kinds and c.proc is not None]
    for c in members:
      if c.proc.poll() is None:
        c.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    for c in members:
      grace = self.stop_grace_s[c.kind]
      try:
        c.proc.wait(max(0.1, start + grace - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.say(f'[launcher] {c.role} did not stop in {grace:.0f}s after '
                 'SIGTERM; killing it')
        try:
          os.killpg(c.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        c.proc.wait()

  # --- the run
  def run(self) -> int:
    os.makedirs(self.log_dir, exist_ok=True)
    old_handlers = self._install_signals()
    for c in self.children:
      self._spawn(c)
    self.say(f'[launcher] started {", ".join(c.role for c in self.children)}'
             f'; logs in {self.log_dir}')
    self.progress.start(self.log_dir)
    try:
      self._watch()
    finally:
      self.say(f'[launcher] {self._stop_reason or "stopping"}; stopping '
               'children')
      self.shutdown()
      self.progress.stop()
      for sig, old in old_handlers.items():
        signal.signal(sig, old)
    self.say(self.progress_line())
    self.say(f'[launcher] exit {self._exit_code}')
    return self._exit_code

  def _watch(self) -> None:
    """Watches the children until a stop is requested."""
    last_progress = time.monotonic()
    parent = os.getppid()
    while not self._stop.wait(self._wait_s()):
      if os.getppid() != parent:
        self.request_stop('the process that started the launcher exited')
        return
      now = time.monotonic()
      for c in self.children:
        self._check(c, now)
      self._check_cluster(now)
      if time.monotonic() - last_progress >= self.progress_interval_s:
        last_progress = time.monotonic()
        self.say(self.progress_line())

  def _wait_s(self) -> float:
    """The loop's next wait: 0.5s, or less when a restart falls due sooner."""
    due = [c.restart_at for c in self.children if c.restart_at is not None]
    if not due:
      return 0.5
    return min(0.5, max(0.01, min(due) - time.monotonic()))

  def _check(self, c: Child, now: float) -> None:
    """Starts `c` again when its restart is due, or deals with its exit."""
    if c.restart_at is not None:
      if self._learner_done is not None:
        c.restart_at, c.done, c.end = None, True, 'training finished'
      elif now >= c.restart_at:
        c.restart_at = None
        c.restarts += 1
        self.say(f'[launcher] restarting {c.role} (restart {c.restarts})')
        self._spawn(c)
      return
    if c.done or c.proc.poll() is None:
      return
    code = c.proc.returncode
    if c.kind == 'learner':
      self._learner_exited(c, code, now)
    elif c.kind == 'replay_server':
      self.say(f'[launcher] {c.role} exited with code {code}; stopping the '
               'cluster')
      self._fail('replay server exited')
    elif c.kind == 'actor':
      self._collector_exited(c, code, now)
    else:
      c.done = True
      if code != 0:
        self.say(f'[launcher] {c.role} died with exit code {code}')
        self._exit_code = 1

  def _group(self, c: Child) -> List[Child]:
    return [m for m in self.children if m.group == c.group] if c.group else [c]

  def _learner_exited(self, c: Child, code: int, now: float) -> None:
    group = self._group(c)
    if code == 0:
      c.done = True
      if all(m.done for m in group):
        self._learner_done = now
        self.say('[launcher] learner finished (exit 0); waiting for actors '
                 'and evaluator to see the final weights')
    elif len(group) == 1:
      self.say(f'[launcher] learner died with exit code {code}; stopping the '
               'cluster (see its log above)')
      self._fail('learner failed')
    else:
      self._restart_group(group, c, code, now)

  def _restart_group(self, group: List[Child], c: Child, code: int,
                     now: float) -> None:
    """A worker of a multi-worker learner died: its peers cannot go on
    (their collectives wait for it), so every worker is stopped and, after
    the backoff, the whole group starts again from the chief's checkpoint.
    """
    chief = group[0]
    if now - chief.started_at >= self.healthy_after_s:
      chief.failures = 0
    chief.failures += 1
    for m in group:
      if m.proc is not None and m.proc.poll() is None:
        try:
          os.killpg(m.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        m.proc.wait()
    if chief.failures > self.max_restarts:
      self.say(f'[launcher] {c.role} died with exit code {code}; the '
               f'learner workers failed {chief.failures} times in a row '
               f'(--max_actor_restarts={self.max_restarts}); stopping the '
               'cluster (see their logs above)')
      self._fail('learner workers failed')
      return
    delay = self.restart_delay_s(chief.failures)
    self.say(f'[launcher] {c.role} died with exit code {code}; restarting '
             f'all {len(group)} learner workers in {delay:.1f}s (they resume '
             "from the chief's last checkpoint; consecutive failure "
             f'{chief.failures}/{self.max_restarts})')
    for m in group:
      m.done, m.restart_at = False, now + delay

  def _collector_exited(self, c: Child, code: int, now: float) -> None:
    """Restarts a dead actor after its backoff, or marks it done, and why."""
    if code == 0:
      c.done, c.end = True, 'exited 0'
      return
    ran = now - c.started_at
    if ran >= self.healthy_after_s:
      c.failures = 0
    c.failures += 1
    if self._learner_done is not None:
      why = 'training finished'
    elif not c.restartable:
      why = '--restart_actors=false'
    elif c.failures > self.max_restarts:
      why = (f'{c.failures} consecutive failure'
             f'{"s" if c.failures > 1 else ""}, --max_actor_restarts='
             f'{self.max_restarts}')
    else:
      delay = self.restart_delay_s(c.failures)
      c.restart_at = now + delay
      self.say(f'[launcher] {c.role} died with exit code {code}; restarting '
               f'it in {delay:.1f}s (consecutive failure {c.failures}/'
               f'{self.max_restarts}, it ran {ran:.0f}s)')
      return
    self.say(f'[launcher] {c.role} died with exit code {code}; not '
             f'restarting it ({why})')
    c.done, c.end = True, f'died with exit code {code}, not restarted: {why}'

  def _check_cluster(self, now: float) -> None:
    """Stops the run when training is over or no actor is left to collect."""
    others = [c for c in self.children if c.kind in ('actor', 'evaluator')]
    collectors = [c for c in others if c.kind == 'actor']
    if self._learner_done is not None:
      if all(c.done for c in others):
        self.request_stop('training finished')
      elif now - self._learner_done > _FINISHED_GRACE_S:
        self.say('[launcher] actors/evaluator still running '
                 f'{_FINISHED_GRACE_S:.0f}s after the learner finished; '
                 'stopping them')
        self.request_stop('training finished')
    elif (collectors and all(c.done for c in collectors) and
          not self._stop.is_set()):
      # Nobody writes to replay any more: the learner would wait for data
      # forever.
      self._collectors_gone = self._collectors_gone or now
      if (all(c.end != 'exited 0' for c in collectors) or
          now - self._collectors_gone > _COLLECTORS_FINISHED_GRACE_S):
        self.say('[launcher] error: no actor is left to collect while the '
                 'learner trains ('
                 + '; '.join(f'{c.role} {c.end}' for c in collectors)
                 + '); stopping the cluster (see the actor logs above)')
        self._fail('no actor left')
