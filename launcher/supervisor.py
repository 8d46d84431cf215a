"""Starts and watches a whole cluster on one machine.

Owns the child processes: starts the replay server, the learner, the actors
and the evaluator with the same flags, echoes their log lines prefixed with
their role, prints one progress line, restarts dead actors, and shuts every
child down on SIGINT/SIGTERM. The learner and the server are never restarted
silently: if either fails, the run fails.
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

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


@dataclasses.dataclass
class Child:
  role: str
  module: str
  args: List[str]
  restartable: bool = False
  proc: Optional[subprocess.Popen] = None
  restarts: int = 0
  done: bool = False  # Exited 0 and is not to be restarted.


class Supervisor:
  """Runs the children; `run()` returns the launcher's exit code."""

  def __init__(self, children: List[Child], log_dir: str, train_steps: int,
               show_child_logs: bool = True,
               progress_interval_s: float = 10.0, max_restarts: int = 5,
               shutdown_grace_s: float = 20.0, out=None):
    self.children = children
    self.log_dir = log_dir
    self.train_steps = train_steps
    self.show_child_logs = show_child_logs
    self.progress_interval_s = progress_interval_s
    self.max_restarts = max_restarts
    self.shutdown_grace_s = shutdown_grace_s
    self._out = out or sys.stdout
    self._print_lock = threading.Lock()
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
  def say(self, text: str) -> None:
    with self._print_lock:
      self._out.write(text + '\n')
      self._out.flush()

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
    path = os.path.join(self.log_dir, f'{child.role}.log')
    with open(path, 'a', errors='replace') as log:
      for raw in proc.stdout:
        line = raw.decode('utf-8', errors='replace').rstrip('\n')
        log.write(line + '\n')
        log.flush()
        self._parse(child.role, line)
        if self.show_child_logs:
          self.say(f'[{child.role}] {line}')

  # --- processes
  def _spawn(self, child: Child) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    child.proc = subprocess.Popen(
        [sys.executable, '-m', child.module] + child.args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        # Own process group: a terminal's Ctrl-C reaches the launcher only,
        # which then stops the children in order.
        start_new_session=True, preexec_fn=_die_with_parent)
    threading.Thread(target=self._pump, args=(child, child.proc),
                     daemon=True).start()

  def request_stop(self, reason: str) -> None:
    if not self._stop.is_set():
      self._stop_reason = reason
      self._stop.set()

  def _install_signals(self) -> None:
    def handler(signum, _frame):
      if self._stop.is_set():
        self.say('[launcher] second signal: killing every child now')
        for c in self.children:
          if c.proc and c.proc.poll() is None:
            os.killpg(c.proc.pid, signal.SIGKILL)
        os._exit(130)  # pylint: disable=protected-access
      self.request_stop(f'{signal.Signals(signum).name} received')
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

  def shutdown(self) -> None:
    """SIGTERM the children in order, then SIGKILL whatever is left.

    The learner goes first, while actors still feed it, so it checkpoints at
    once; the server goes last, once nobody talks to it.
    """
    deadline = time.monotonic() + self.shutdown_grace_s
    rank = {'learner': 0, 'replay_server': 2}
    for group in (0, 1, 2):
      members = [c for c in self.children
                 if rank.get(c.module, 1) == group and c.proc is not None]
      for c in members:
        if c.proc.poll() is None:
          c.proc.send_signal(signal.SIGTERM)
      for c in members:
        try:
          c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          self.say(f'[launcher] {c.role} did not stop in '
                   f'{self.shutdown_grace_s:.0f}s; killing it')
          os.killpg(c.proc.pid, signal.SIGKILL)
          c.proc.wait()

  def run(self) -> int:
    os.makedirs(self.log_dir, exist_ok=True)
    self._install_signals()
    for c in self.children:
      self._spawn(c)
    self.say(f'[launcher] started {", ".join(c.role for c in self.children)}'
             f'; logs in {self.log_dir}')
    exit_code = 0
    last_progress = time.monotonic()
    learner_done = None
    parent = os.getppid()
    try:
      while not self._stop.wait(0.5):
        if os.getppid() != parent:
          self.request_stop('the process that started the launcher exited')
          break
        for c in self.children:
          if c.done or c.proc.poll() is None:
            continue
          code = c.proc.returncode
          if c.role == 'learner':
            if code == 0:
              c.done = True
              learner_done = time.monotonic()
              self.say('[launcher] learner finished (exit 0); waiting for '
                       'actors and evaluator to see the final weights')
            else:
              self.say(f'[launcher] learner died with exit code {code}; '
                       'stopping the cluster (see its log above)')
              exit_code = 1
              self.request_stop('learner failed')
          elif c.module == 'replay_server':
            self.say(f'[launcher] {c.role} exited with code {code}; '
                     'stopping the cluster')
            exit_code = 1
            self.request_stop('replay server exited')
          elif code == 0:
            c.done = True
          elif c.restartable and c.restarts < self.max_restarts:
            c.restarts += 1
            self.say(f'[launcher] {c.role} died with exit code {code}; '
                     f'restarting it ({c.restarts}/{self.max_restarts})')
            self.env_rates.pop(c.role, None)
            self._spawn(c)
          else:
            self.say(f'[launcher] {c.role} died with exit code {code}'
                     + ('; not restarting it' if c.restartable else ''))
            c.done = True
            if c.role == 'evaluator':
              exit_code = exit_code or 1
        others = [c for c in self.children
                  if c.module not in ('learner', 'replay_server')]
        if learner_done is not None and all(c.done for c in others):
          self.request_stop('training finished')
        elif learner_done and time.monotonic() - learner_done > 300:
          self.say('[launcher] actors/evaluator still running 300s after the '
                   'learner finished; stopping them')
          self.request_stop('training finished')
        if time.monotonic() - last_progress >= self.progress_interval_s:
          last_progress = time.monotonic()
          self.say(self.progress_line())
    finally:
      self.say(f'[launcher] {self._stop_reason or "stopping"}; stopping '
               'children')
      self.shutdown()
    self.say(self.progress_line())
    self.say(f'[launcher] exit {exit_code}')
    return exit_code
