"""What the collector's and the evaluator's loops do besides acting.

Each is a small callable the loop calls once per round (TF-Agents'
`train/triggers.py` style): it decides for itself whether it is due (an
interval of seconds or of train steps) and does one thing: the done check,
the max-priority refresh, the progress line, the TensorBoard summaries; after
an evaluation, the metrics row, the status published for the launcher, the
video. `RollbackCheck` is the one check, for both loops, that the weights
went back (a learner restored an older checkpoint).
"""

import json
import os
import time
from typing import Callable, Dict, Optional, Sequence

from absl import logging
import tensorflow as tf

from actor import eval_outputs
from common import progress
from variable_container import status


class RollbackCheck:
  """Notices the learner's train_step going back.

  A learner restarted from an older checkpoint: its weights are the truth
  from then on, and the step counts from there again.
  """

  def __init__(self, who: str):
    self._who = who
    self.last_step: Optional[int] = None

  def __call__(self, step: Optional[int], then: str) -> bool:
    """Records `step` (None: nothing read, ignored); True, with a warning
    that ends in `then` (what happens next), when it is older than the last
    step seen."""
    if step is None:
      return False
    last, self.last_step = self.last_step, step
    if last is None or step >= last:
      return False
    logging.warning('%s: the weights went back from train_step %d to %d (a '
                    'learner restored an older checkpoint); %s', self._who,
                    last, step, then)
    return True


class DoneCheck:
  """`should_stop` for the writers: a stop signal, or training has finished.

  Asks the variable container at most every `interval_s` (the writers call
  it while the rate limiter blocks them).
  """

  def __init__(self, container, max_train_steps: int,
               should_stop: Callable[[], bool], interval_s: float):
    self._container = container
    self._max = max_train_steps
    self._should_stop = should_stop
    self._interval_s = interval_s
    self._last = 0.0
    self.training_done = False

  def __call__(self) -> bool:
    if self._should_stop() or self.training_done:
      return True
    now = time.monotonic()
    if now - self._last >= self._interval_s:
      self._last = now
      step = self._container.latest_train_step()
      self.training_done = step is not None and step >= self._max
    return self.training_done


class PriorityRefresh:
  """A prioritized table: new items enter at the largest priority the learner
  has written (read with every pull), so each is sampled soon."""

  def __init__(self, read_max_priority: Callable[[], Optional[float]],
               observers: Sequence, who: str):
    self._read = read_max_priority
    self._observers = observers
    self._who = who

  def __call__(self) -> None:
    try:
      priority = self._read()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: cannot read the max priority (%s); keeping the '
                      'last one', self._who, type(e).__name__)
      return
    if priority is not None:
      for observer in self._observers:
        observer.update_priority(priority)


class ProgressLog:
  """The actor's progress line, every `interval_s`: phase, env steps, rate,
  episodes and the weights it acts with (`weights_step`)."""

  def __init__(self, who: str, collector, envs, interval_s: float):
    self._who = who
    self._collector = collector
    self._envs = envs
    self._interval_s = interval_s
    self.meter = progress.RateMeter()
    self.weights_step: Optional[int] = None

  def __call__(self, phase: str) -> None:
    if not self.meter.due(self._interval_s):
      return
    rate = self.meter.update(self._collector.env_steps)
    policy = ('random policy' if phase == 'random' else
              f'weights of train_step {self.weights_step}')
    logging.info('%s: %s  env_steps %d  %.1f env steps/s  episodes %d  '
                 'acting with %s', self._who, phase,
                 self._collector.env_steps, rate, self._envs.episodes, policy)


class ActorSummaries:
  """The actor's TensorBoard scalars: TF-Agents' Actor metrics once per
  `interval_steps` train steps (as its Actor writes them once per summary
  interval), the weight lag and the rate with every pull."""

  def __init__(self, logdir: str, stats, interval_steps: int,
               rate: Callable[[], float]):
    self._writer = tf.summary.create_file_writer(logdir, flush_millis=10000)
    self._stats = stats
    self._interval = interval_steps
    self._rate = rate
    self.restart()

  def restart(self) -> None:
    """The next call writes the metrics (the train_step went back)."""
    self._last = -self._interval

  def __call__(self, step: int, lag: int) -> None:
    with self._writer.as_default():
      if step - self._last >= self._interval:
        self._stats.write_summaries(step)
        self._last = step
      tf.summary.scalar('Actor/weight_version_lag', lag, step=step)
      tf.summary.scalar('Actor/env_steps_per_second', self._rate(),
                        step=step)

  def flush(self) -> None:
    self._writer.flush()


class EvalSchedule:
  """The train steps to evaluate: every `interval` and the final one."""

  def __init__(self, interval: int, max_train_steps: int):
    self._interval = interval
    self._max = max_train_steps
    self.next_step = 0

  def due(self, step: Optional[int]) -> bool:
    return step is not None and (step >= self.next_step or
                                 step >= self._max)

  def evaluated(self, step: int) -> None:
    self.next_step = (step // self._interval + 1) * self._interval


class MetricsRecord:
  """After an evaluation: its TensorBoard summaries, its line of
  metrics.jsonl, the log line and the redrawn returns plot."""

  def __init__(self, eval_actor: Callable[[], object], metrics_path: str,
               plot_path: str, read_rows: Callable[[], list], title: str):
    self._eval_actor = eval_actor  # The TF-Agents Actor that just ran.
    self._metrics_path = metrics_path
    self._plot_path = plot_path
    self._read_rows = read_rows
    self._title = title

  def __call__(self, step: int, row: Dict) -> None:
    eval_actor = self._eval_actor()
    eval_actor.write_metric_summaries()
    eval_actor.summary_writer.flush()
    with open(self._metrics_path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    logging.info('evaluator: train_step %d  AverageReturn %.2f  '
                 'AverageEpisodeLength %.1f (%d episodes, %.1fs)', step,
                 row['AverageReturn'], row['AverageEpisodeLength'],
                 row['num_episodes'], row['eval_seconds'])
    eval_outputs.plot_returns(self._read_rows(), self._plot_path, self._title)


class StatusPublish:
  """After an evaluation: the evaluator's status (`variable_container.status`)
  on every server in `addresses` that answers and has the status table, for
  the launcher's progress line."""

  def __init__(self, addresses: Sequence[str]):
    self._publisher = status.Publisher(addresses, status.EVALUATOR)

  def __call__(self, step: int, row: Dict) -> None:
    self._publisher.publish(train_step=step,
                            average_return=row['AverageReturn'],
                            episodes=row['num_episodes'],
                            average_episode_length=row['AverageEpisodeLength'])
    # Before the next evaluation's minutes of work: the launcher shows it now.
    self._publisher.flush(timeout_s=5.0)


class Video:
  """After an evaluation: `episodes` greedy episodes rendered into
  `<eval_dir>/step_<N>.mp4` at the final train_step and, with `interval`,
  at every `interval` train steps."""

  def __init__(self, env, policy, eval_dir: str, episodes: int, interval: int,
               max_train_steps: int, env_name: str,
               after: Callable[[], None], fps: float):
    self._env = env
    self._fps = fps  # The control rate: it plays at the speed it was acted.
    self._policy = policy
    self._eval_dir = eval_dir
    self._episodes = episodes
    self._interval = interval
    self._max = max_train_steps
    self._env_name = env_name
    self._after = after  # The video moved the environment on.
    self._next = interval

  def __call__(self, step: int, row: Dict) -> None:
    del row
    final = step >= self._max
    if not self._episodes or not (
        final or (self._interval and step >= self._next)):
      return
    path = os.path.join(self._eval_dir, f'step_{step:08d}.mp4')
    try:
      frames = eval_outputs.write_video(self._env, self._policy, path,
                                        self._episodes, self._fps)
      logging.info('evaluator: wrote %s (%d frames at %g fps: %.1f s)', path,
                   frames, self._fps, frames / self._fps)
    except NotImplementedError:
      logging.warning('evaluator: --env=%s cannot render; no video',
                      self._env_name)
    self._after()
    if self._interval:
      self._next = (step // self._interval + 1) * self._interval
