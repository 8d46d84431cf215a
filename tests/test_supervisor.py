"""The launcher's Supervisor with stand-in children (tests/stub_child.py).

Restarts with backoff, giving up, a run with no actor left, log pumps that
survive failing writes, the stop order with a grace per group, and a
progress line read from a real Reverb server's status tables, whatever the
children log. The stubs are real OS processes; the one replay server is the
real binary.
"""

import errno
import os
import re
import threading
import time

import numpy as np
import pytest
import reverb

from common import table_names
from launcher import progress_line
from launcher import supervisor
from launcher.local_cluster import REPO_ROOT
from launcher.local_cluster import free_port
from variable_container import status

STUB = 'tests.stub_child'


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  # The children run `python -m tests.stub_child` from the current directory.
  monkeypatch.chdir(REPO_ROOT)


class Lines:
  """An output stream that keeps each line with the time it was written."""

  def __init__(self):
    self._lock = threading.Lock()
    self.lines = []

  def write(self, text: str) -> None:
    now = time.monotonic()
    with self._lock:
      self.lines.extend((now, line) for line in text.splitlines())

  def flush(self) -> None:
    pass

  def text(self) -> str:
    with self._lock:
      return '\n'.join(line for _, line in self.lines)

  def times_of(self, pattern: str):
    with self._lock:
      return [t for t, line in self.lines if re.search(pattern, line)]

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      m = re.search(pattern, self.text())
      if m:
        return m
      time.sleep(0.1)
    raise AssertionError(f'no {pattern!r} in {timeout}s:\n{self.text()}')


class FailingChildLines(Lines):
  """A stdout that fails (EPIPE) on every child line; the launcher's pass."""

  def write(self, text: str) -> None:
    if not text.startswith('[launcher]'):
      raise OSError(errno.EPIPE, 'Broken pipe')
    super().write(text)


def run(sup: supervisor.Supervisor, timeout_s: float, until=None):
  """(exit code, seconds) of `sup.run()` in this thread.

  A watcher stops the supervisor once `until()` is true, or after
  `timeout_s` (so that a supervisor that would wait forever ends the test).
  """
  finished = threading.Event()

  def watch():
    deadline = time.monotonic() + timeout_s
    while not finished.wait(0.1):
      if until is not None and until():
        sup.request_stop('the test has seen enough')
        return
      if time.monotonic() > deadline:
        sup.request_stop('the test timed out')
        return

  threading.Thread(target=watch, daemon=True).start()
  start = time.monotonic()
  try:
    return sup.run(), time.monotonic() - start
  finally:
    finished.set()


def learner_stub(*args):
  return supervisor.Child('learner', STUB, list(args))


def actor_stub(task=0, *args, restartable=True):
  return supervisor.Child(f'actor_{task}', STUB, list(args),
                          restartable=restartable)


def test_only_actor_dead_and_not_restarted_stops_the_run(tmp_path):
  out = Lines()
  sup = supervisor.Supervisor(
      [learner_stub(), actor_stub(0, '--exit_after_s=0.5', '--code=3',
                                  restartable=False)],
      str(tmp_path / 'logs'), train_steps=100, out=out)
  code, seconds = run(sup, timeout_s=30)
  text = out.text()
  assert code == 1, text
  assert seconds < 15, text
  lines = [line for line in text.splitlines() if 'no actor is left' in line]
  assert lines == ['[launcher] error: no actor is left to collect while the '
                   'learner trains (actor_0 died with exit code 3, not '
                   'restarted: --restart_actors=false); stopping the cluster '
                   '(see the actor logs above)'], text
  assert '[learner] stub stopped' in text  # Stopped by SIGTERM, not killed.


def test_a_dying_actor_is_restarted_with_growing_delays_then_given_up(
    tmp_path):
  out = Lines()
  # The defaults but for --max_actor_restarts: 2s, doubled per failure.
  sup = supervisor.Supervisor(
      [learner_stub(), actor_stub(0, '--exit_after_s=0', '--code=1')],
      str(tmp_path / 'logs'), train_steps=100, max_restarts=2, out=out)
  code, _ = run(sup, timeout_s=40)
  text = out.text()
  died = out.times_of(r'actor_0 died with exit code 1;')
  restarted = out.times_of(r'restarting actor_0 \(restart \d\)')
  assert len(died) == 3 and len(restarted) == 2, text
  delays = [r - d for d, r in zip(died, restarted)]
  # The 'died' line is printed a moment after the delay starts.
  assert 1.9 <= delays[0] < 3.5 and 3.9 <= delays[1] < 5.5, (delays, text)
  assert re.search(r'actor_0 died with exit code 1; restarting it in 2.0s '
                   r'\(consecutive failure 1/2', text), text
  assert re.search(r'actor_0 died with exit code 1; restarting it in 4.0s '
                   r'\(consecutive failure 2/2', text), text
  assert ('actor_0 died with exit code 1; not restarting it (3 consecutive '
          'failures, --max_actor_restarts=2)') in text, text
  # Given up on, it leaves no collector: the run stops rather than starve.
  assert code == 1, text
  assert 'no actor is left to collect' in text, text


def test_an_actor_that_ran_long_enough_starts_its_count_again(tmp_path):
  out = Lines()
  sup = supervisor.Supervisor(
      [learner_stub(), actor_stub(0, '--exit_after_s=1.5', '--code=1')],
      str(tmp_path / 'logs'), train_steps=100, max_restarts=1,
      restart_backoff_s=0.2, healthy_after_s=1.0, out=out)
  # Without the reset, its second death would be its last.
  code, _ = run(sup, timeout_s=40, until=lambda: len(
      out.times_of('actor_0 died with exit code 1;')) >= 3)
  text = out.text()
  assert code == 0, text
  assert text.count('restarting it in 0.2s (consecutive failure 1/1') >= 3, text
  assert 'not restarting it' not in text, text


def test_the_supervisor_watches_the_others_while_a_restart_waits(tmp_path):
  out = Lines()
  sup = supervisor.Supervisor(
      [learner_stub('--exit_after_s=2', '--code=4'),
       actor_stub(0, '--exit_after_s=0', '--code=1')],
      str(tmp_path / 'logs'), train_steps=100, restart_backoff_s=30, out=out)
  code, seconds = run(sup, timeout_s=40)
  text = out.text()
  assert 'actor_0 died with exit code 1; restarting it in 30.0s' in text, text
  assert 'learner died with exit code 4; stopping the cluster' in text, text
  assert code == 1 and seconds < 20, (seconds, text)
  assert 'restarting actor_0' not in text, text


def _chatty_learner():
  # 1 MiB of log lines, 16 pipe buffers: it blocks unless they are drained.
  return learner_stub('--log_bytes=1048576', '--exit_after_s=0')


def test_a_full_log_disk_never_blocks_a_child(tmp_path, capsys):
  log_dir = tmp_path / 'logs'
  log_dir.mkdir()
  # Every write to /dev/full fails with ENOSPC, as on a full disk.
  os.symlink('/dev/full', log_dir / 'learner.log')
  out = Lines()
  sup = supervisor.Supervisor([_chatty_learner()], str(log_dir),
                              train_steps=100, show_child_logs=False, out=out)
  code, _ = run(sup, timeout_s=30)
  text = out.text()
  assert code == 0, text
  assert 'learner finished (exit 0)' in text, text
  assert 'training finished; stopping children' in text, text
  errors = capsys.readouterr().err.splitlines()
  assert [e for e in errors if 'learner.log' in e] == [
      f'[launcher] error: cannot write {log_dir}/learner.log ([Errno 28] No '
      'space left on device); learner log lines are dropped there until '
      'writes succeed again'], errors


def test_a_closed_stdout_never_blocks_a_child(tmp_path, capsys):
  out = FailingChildLines()
  sup = supervisor.Supervisor([_chatty_learner()], str(tmp_path / 'logs'),
                              train_steps=100, out=out)
  code, _ = run(sup, timeout_s=30)
  text = out.text()
  assert code == 0, text
  assert 'training finished; stopping children' in text, text
  errors = capsys.readouterr().err.splitlines()
  assert [e for e in errors if 'output' in e] == [
      '[launcher] error: cannot write to its output ([Errno 32] Broken pipe); '
      f'its lines are dropped from there, the child logs in {tmp_path}/logs '
      'go on'], errors
  # The log file has every line.
  with open(tmp_path / 'logs' / 'learner.log') as f:
    assert f.read().count('x' * 99) > 10000


def test_a_slow_learner_stop_leaves_the_server_its_final_checkpoint(
    tmp_path):
  """The learner takes 20.5s to stop; the server still checkpoints on stop.

  With one deadline for all (20s), the learner was killed and the server had
  0.1s left before its SIGKILL, in the middle of its final checkpoint.
  """
  checkpoint_dir = tmp_path / 'replay_checkpoints'
  out = Lines()
  server = supervisor.Child('replay_server', 'replay_server', [
      '--env=Pendulum-v1', f'--port={free_port()}',
      f'--checkpoint_dir={checkpoint_dir}', '--replay_capacity=1000',
      '--min_size_to_sample=256'])
  sup = supervisor.Supervisor([server, learner_stub('--stop_delay_s=20.5')],
                              str(tmp_path / 'logs'), train_steps=100,
                              out=out)
  code, _ = run(sup, timeout_s=120, until=lambda: re.search(
      r'\[replay_server\].*serving tables', out.text()))
  text = out.text()
  assert code == 0, text
  assert '[learner] stub stopped' in text, text
  assert 'killing it' not in text, text
  m = re.search(r'checkpoint \(on stop\) written to (\S+?):? ', text)
  assert m, text
  assert os.path.isdir(m.group(1)), (m.group(1), text)
  # The server was asked to stop only once the learner had gone.
  stopped = out.times_of(r'\[learner\] stub stopped')[0]
  assert out.times_of(r'checkpoint \(on stop\)')[0] > stopped


@pytest.fixture
def status_server():
  """A real Reverb server with the status tables and a replay table."""
  replay = reverb.Table(
      name=table_names.REPLAY_TABLE, sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(), max_size=1000,
      rate_limiter=reverb.rate_limiters.MinSize(1))
  server = reverb.Server(status.status_tables() + [replay])
  yield f'localhost:{server.port}'
  server.stop()


def _progress_lines(tmp_path, address, said):
  """The progress lines of a run whose learner stub logs the lines `said`,
  while the status tables say train_step 42 and AverageReturn -123.45."""
  client = reverb.Client(address)
  status.publish(client, status.LEARNER, train_step=42, train_steps=100,
                 steps_per_s=3.5, finished=False)
  status.publish(client, status.EVALUATOR, train_step=40,
                 average_return=-123.45, episodes=2)
  for i in range(5):
    client.insert(np.float32(i), priorities={table_names.REPLAY_TABLE: 1.0})
  out = Lines()
  sup = supervisor.Supervisor(
      [learner_stub(*[f'--say={line}' for line in said]), actor_stub(0)],
      str(tmp_path / 'logs'), train_steps=100, progress_interval_s=0.5,
      out=out, replay_addresses=[address])
  code, _ = run(sup, timeout_s=90, until=lambda: len(
      out.times_of(r'^\[launcher\] train_step 42/')) >= 3)
  text = out.text()
  assert code == 0, text
  for line in said:
    assert f'[learner] {line}' in text, text  # Still echoed.
  assert not sup.progress.feed_running(), 'the status feed outlived its run'
  return [line.split(' | elapsed')[0] for line in text.splitlines()
          if line.startswith('[launcher] train_step 42/')]


def test_the_progress_line_comes_from_status_tables_not_log_text(
    tmp_path, status_server):
  # The old log formats, with other numbers: a line parsed from log text
  # would show train_step 7 and AverageReturn 1.00.
  old_format = ['learner: train_step 7/100  9.0 steps/s  loss 0.5',
                'evaluator: train_step 5  AverageReturn 1.00  episodes 2',
                'actor 0: collect  env_steps 10  99.0 env steps/s']
  lines = _progress_lines(tmp_path / 'a', status_server, old_format)
  assert lines[0] == ('[launcher] train_step 42/100 (42.0%) | 3.5 train '
                      'steps/s | 0.0 env steps/s (1 actors) | AverageReturn '
                      '-123.45 (at step 40)'), lines
  assert len(set(lines)) == 1, lines  # The final line too.
  reworded = ['learner: at step 7 of 100, 9.0 steps a second',
              'evaluator: step 5, average return 1.00']
  assert set(_progress_lines(tmp_path / 'b', status_server, reworded)) == {
      lines[0]}


def test_the_env_rate_is_each_shards_insert_growth_over_the_window():
  line = progress_line.ProgressLine(train_steps=100, window_s=2.0)
  line.update({'inserted_items': {'a': 100, 'b': 50}}, now=0.0)
  line.update({'inserted_items': {'a': 110, 'b': 60}}, now=1.0)
  assert line.env_rate == 20.0
  # Shard b restarted (its count fell), shard a went away: neither counts
  # from 1.0 to 2.0.
  line.update({'inserted_items': {'b': 5}}, now=2.0)
  assert line.env_rate == 10.0  # 20 in the window's 2 s.
  line.update({'inserted_items': {'b': 25}}, now=3.0)
  assert line.env_rate == 10.0  # The window starts at 1.0 now.
  line.update({'inserted_items': {'b': 45}}, now=4.0)
  assert line.env_rate == 20.0
  assert '20.0 env steps/s (2 actors)' in line.line(2, elapsed_s=5.0)


def test_a_dead_learner_worker_restarts_the_whole_group(tmp_path):
  """Workers of one multi-worker learner live and die together: one that
  dies has the others killed and all of them started again after the
  backoff; the run ends once every worker exited 0."""
  out = Lines()
  group = [supervisor.Child('learner', STUB, [], group='learner',
                            kind='learner'),
           supervisor.Child('learner_1', STUB,
                            ['--exit_after_s=1', '--code=1'],
                            group='learner', kind='learner')]
  sup = supervisor.Supervisor(
      group + [actor_stub(0)], str(tmp_path / 'logs'), train_steps=100,
      max_restarts=1, restart_backoff_s=0.5, out=out)
  code, _ = run(sup, timeout_s=60)
  text = out.text()
  assert re.search(r'learner_1 died with exit code 1; restarting all 2 '
                   r'learner workers in 0.5s', text), text
  # Both were started again (the chief was killed, not left running alone).
  assert 'restarting learner (restart 1)' in text, text
  assert 'restarting learner_1 (restart 1)' in text, text
  # The second death is past --max_actor_restarts=1: the run fails.
  assert 'the learner workers failed 2 times in a row' in text, text
  assert code == 1, text
