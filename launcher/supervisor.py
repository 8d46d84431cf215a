"""Starts and watches a whole cluster on one machine.

Owns the child processes: starts the replay server, the learner, the actors
and the evaluator with the same flags, echoes their log lines prefixed with
their role, prints one progress line, restarts dead actors (with backoff, up
to a number of consecutive failures), stops the run when no actor is left to
collect, and shuts every child down on SIGINT/SIGTERM, in order, each group
with its own grace. The learner and the server are never restarted silently:
if either fails, the run fails.
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional

from common import progress


def _die_with_parent() -> None:
  """In the child: get SIGTERM if the launcher dies, even by SIGKILL (Linux)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    pr_set_pdeathsig = 1
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(pr_set_pdeathsig,
                                                   signal.SIGTERM)
  except OSError:
    pass

# Patterns in the children's log lines that feed the progress line.
_TRAIN_RE = re.compile(r'learner: train_step (\d+)/(\d+)\s+([\d.]+) steps/s')
_FINISHED_RE = re.compile(r'learner: finished at train_step (\d+)')
_ENV_RATE_RE = re.compile(r'actor (\d+): \w+\s+env_steps (\d+)\s+([\d.]+) env '
                          r'steps/s')
_RETURN_RE = re.compile(r'evaluator: train_step (\d+)\s+AverageReturn '
                        r'([-\d.eE+naif]+)')

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


def _reason(e: BaseException) -> str:
  return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


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
          re.fullmatch(r'replay_server(_\d+)?', self.role)):
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
  """

  def __init__(self, children: List[Child], log_dir: str, train_steps: int,
               show_child_logs: bool = True,
               progress_interval_s: float = 10.0, max_restarts: int = 5,
               restart_backoff_s: float = 2.0, healthy_after_s: float = 60.0,
               stop_grace_s: Optional[Mapping[str, float]] = None, out=None):
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
    # Progress state, fed by the log readers.
    self.train_step = 0
    self.train_rate = 0.0
    self.env_rates: Dict[str, float] = {}
    self.average_return: Optional[float] = None
    self.eval_step: Optional[int] = None
    self._meter = progress.RateMeter(0, train_steps)
    self._start_time = time.monotonic()

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
                        f'({_reason(e)}); its lines are dropped from there, '
                        f'the child logs in {self.log_dir} go on')

  def progress_line(self) -> str:
    env_rate = sum(self.env_rates.values())
    ret = ('-' if self.average_return is None else
           f'{self.average_return:.2f} (at step {self.eval_step})')
    eta = progress.format_duration(
        (self.train_steps - self.train_step) / self.train_rate
    ) if self.train_rate > 0 else '?'
    pct = 100.0 * self.train_step / max(1, self.train_steps)
    return (f'[launcher] train_step {self.train_step}/{self.train_steps} '
            f'({pct:.1f}%) | {self.train_rate:.1f} train steps/s | '
            f'{env_rate:.1f} env steps/s ({len(self.env_rates)} actors) | '
            f'AverageReturn {ret} | elapsed '
            f'{progress.format_duration(time.monotonic() - self._start_time)}'
            f' | ETA {eta}')

  def _parse(self, role: str, line: str) -> None:
    m = _TRAIN_RE.search(line)
    if m:
      self.train_step, self.train_rate = int(m.group(1)), float(m.group(3))
      return
    m = _FINISHED_RE.search(line)
    if m:
      self.train_step = int(m.group(1))
      return
    m = _ENV_RATE_RE.search(line)
    if m:
      self.env_rates[role] = float(m.group(3))
      return
    m = _RETURN_RE.search(line)
    if m:
      self.eval_step, self.average_return = int(m.group(1)), float(m.group(2))

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
                              f'({_reason(e)}); {child.role} log lines are '
                              'dropped there until it opens')
        if log is not None:
          try:
            log.write(raw if raw.endswith(b'\n') else raw + b'\n')
          except Exception as e:  # pylint: disable=broad-except
            self._report_once(path, f'[launcher] error: cannot write {path} '
                              f'({_reason(e)}); {child.role} log lines are '
                              'dropped there until writes succeed again')
        line = raw.decode('utf-8', errors='replace').rstrip('\n')
        self._parse(child.role, line)
        if self.show_child_logs:
          self.say(f'[{child.role}] {line}')
      except Exception as e:  # pylint: disable=broad-except
        self._report_once(('pump', child.role), '[launcher] error: reading '
                          f'{child.role} output failed ({_reason(e)}); '
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
        start_new_session=True, preexec_fn=_die_with_parent)
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

  def _collector_exited(self, c: Child, code: int, now: float,
                        learner_done: bool) -> None:
    """Restarts a dead actor after its backoff, or marks it done, and why."""
    if code == 0:
      c.done, c.end = True, 'exited 0'
      return
    ran = now - c.started_at
    if ran >= self.healthy_after_s:
      c.failures = 0
    c.failures += 1
    self.env_rates.pop(c.role, None)
    if learner_done:
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

  def run(self) -> int:
    os.makedirs(self.log_dir, exist_ok=True)
    old_handlers = self._install_signals()
    for c in self.children:
      self._spawn(c)
    self.say(f'[launcher] started {", ".join(c.role for c in self.children)}'
             f'; logs in {self.log_dir}')
    exit_code = 0
    last_progress = time.monotonic()
    learner_done = None
    collectors_gone = None
    collectors = [c for c in self.children if c.kind == 'actor']
    parent = os.getppid()
    try:
      while not self._stop.wait(self._wait_s()):
        if os.getppid() != parent:
          self.request_stop('the process that started the launcher exited')
          break
        now = time.monotonic()
        for c in self.children:
          if c.restart_at is not None:
            if learner_done is not None:
              c.restart_at, c.done, c.end = None, True, 'training finished'
            elif now >= c.restart_at:
              c.restart_at = None
              c.restarts += 1
              self.say(f'[launcher] restarting {c.role} (restart '
                       f'{c.restarts})')
              self._spawn(c)
            continue
          if c.done or c.proc.poll() is None:
            continue
          code = c.proc.returncode
          if c.kind == 'learner':
            if code == 0:
              c.done = True
              learner_done = now
              self.say('[launcher] learner finished (exit 0); waiting for '
                       'actors and evaluator to see the final weights')
            else:
              self.say(f'[launcher] learner died with exit code {code}; '
                       'stopping the cluster (see its log above)')
              exit_code = 1
              self.request_stop('learner failed')
          elif c.kind == 'replay_server':
            self.say(f'[launcher] {c.role} exited with code {code}; '
                     'stopping the cluster')
            exit_code = 1
            self.request_stop('replay server exited')
          elif c.kind == 'actor':
            self._collector_exited(c, code, now, learner_done is not None)
          else:
            c.done = True
            if code != 0:
              self.say(f'[launcher] {c.role} died with exit code {code}')
              exit_code = exit_code or 1
        others = [c for c in self.children
                  if c.kind in ('actor', 'evaluator')]
        if learner_done is not None and all(c.done for c in others):
          self.request_stop('training finished')
        elif learner_done and time.monotonic() - learner_done > 300:
          self.say('[launcher] actors/evaluator still running 300s after the '
                   'learner finished; stopping them')
          self.request_stop('training finished')
        elif (learner_done is None and collectors and
              all(c.done for c in collectors) and not self._stop.is_set()):
          # Nobody writes to replay any more: the learner would wait for
          # data forever.
          collectors_gone = collectors_gone or now
          if (all(c.end != 'exited 0' for c in collectors) or
              now - collectors_gone > _COLLECTORS_FINISHED_GRACE_S):
            self.say('[launcher] error: no actor is left to collect while '
                     'the learner trains ('
                     + '; '.join(f'{c.role} {c.end}' for c in collectors)
                     + '); stopping the cluster (see the actor logs above)')
            exit_code = 1
            self.request_stop('no actor left')
        if time.monotonic() - last_progress >= self.progress_interval_s:
          last_progress = time.monotonic()
          self.say(self.progress_line())
    finally:
      self.say(f'[launcher] {self._stop_reason or "stopping"}; stopping '
               'children')
      self.shutdown()
      for sig, old in old_handlers.items():
        signal.signal(sig, old)
    self.say(self.progress_line())
    self.say(f'[launcher] exit {exit_code}')
    return exit_code

  def _wait_s(self) -> float:
    """The loop's next wait: 0.5s, or less when a restart falls due sooner."""
    due = [c.restart_at for c in self.children if c.restart_at is not None]
    if not due:
      return 0.5
    return min(0.5, max(0.01, min(due) - time.monotonic()))
