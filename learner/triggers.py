"""What the learner does between train calls, as triggers.

TF-Agents' `triggers.py` style: each trigger is a callable taking the train
step, with an interval of its own (train steps; seconds for the progress
line). The main loop calls them in order after every train call whose loss
came back, the finite-loss guard first: nothing non-finite reaches a
checkpoint, a policy or the actors. The Learner's own triggers would fire
inside `Learner.run`, before the loss is seen, so it gets none.

`Heartbeat` runs on a thread of its own (it must speak while a call is stuck
sampling), and `status.Publisher` sends the learner's status to the servers
as data (`variable_container.status`) off the training thread.
"""

import math
import threading
import time
from typing import Callable, Optional, Sequence

from absl import logging
import reverb
import tensorflow as tf

from common import progress
from common import table_names
from common.errors import UserError
from learner import run_record
from variable_container import status


def loss_error(what: str, step: int, last_checkpoint: Optional[str],
               reason: str = '') -> UserError:
  """The one line that ends training on a non-finite loss."""
  why = f' ({reason})' if reason else ''
  return UserError(f'loss became {what} at train_step {step}{why}; not '
                   f'checkpointed (the last checkpoint is {last_checkpoint}): '
                   'lower the learning rates or reward scale')


class StepTrigger:
  """Fires once `interval` train steps passed since it last fired.

  TF-Agents' `IntervalTrigger`, which also says how many steps are left (the
  loop ends a train call where a push is due). Interval <= 0: never fires.
  """

  def __init__(self, interval: int, start: int):
    self.interval = interval
    self.last = start

  def due(self, step: int) -> bool:
    return self.interval > 0 and step >= self.last + self.interval

  def steps_left(self, step: int) -> int:
    return self.last + self.interval - step

  def __call__(self, step: int) -> None:
    if self.due(step):
      self.fire(step)
      self.last = step

  def fire(self, step: int) -> None:
    raise NotImplementedError


class FiniteLoss:
  """Ends training in one line when the call's loss is NaN or inf.

  Every call: it stands before any save or push.
  """

  def __init__(self, loss: Callable[[], float],
               last_checkpoint: Callable[[], Optional[str]]):
    self._loss = loss
    self._last_checkpoint = last_checkpoint

  def __call__(self, step: int) -> None:
    loss = self._loss()
    if not math.isfinite(loss):
      raise loss_error(str(loss), step, self._last_checkpoint())


class SaveCheckpoint(StepTrigger):
  """A checkpoint every `interval` steps (`run_record.Checkpoints.save`
  refuses non-finite weights; a failed write is tried again next interval)."""

  def __init__(self, checkpoints: run_record.Checkpoints, interval: int,
               start: int):
    super().__init__(interval, start)
    self._checkpoints = checkpoints

  def fire(self, step: int) -> None:
    self._checkpoints.save()


class SavePolicy(StepTrigger):
  """The policy SavedModels' weights every `interval` steps, if finite.

  `saver` is TF-Agents' `PolicySavedModelTrigger`, forced at this trigger's
  steps. A failed write is logged; the next interval tries again.
  """

  def __init__(self, saver, agent, interval: int, start: int):
    super().__init__(interval, start)
    self._saver = saver
    self._agent = agent

  def fire(self, step: int) -> None:
    bad = run_record.non_finite_variables(self._agent.variables)
    if bad:
      raise run_record.weights_error(step, bad, 'policy not saved')
    try:
      self._saver(step, force_trigger=True)
    except run_record.WRITE_ERRORS as e:
      logging.error('learner: policy save at train_step %d failed (%s); '
                    'training goes on, the next interval tries again', step,
                    run_record.describe_error(e))


class PushWeights(StepTrigger):
  """The policy weights and train_step to the actors every `interval` steps."""

  def __init__(self, container, variables, interval: int, start: int):
    super().__init__(interval, start)
    self._container = container
    self._variables = variables

  def due(self, step: int) -> bool:
    return step - self.last >= self.interval

  def fire(self, step: int) -> None:
    self._container.push(self._variables)


class ProgressLine:
  """Every `interval_s`: the progress log line, and the same as status data.

  Also keeps the rate since the first call returned (the run's speed without
  its start-up), for the final line and the result.
  """

  def __init__(self, interval_s: float, start: int, train_steps: int,
               loss: Callable[[], float], publisher: status.Publisher):
    self._interval_s = interval_s
    self._train_steps = train_steps
    self._loss = loss
    self._publisher = publisher
    self._meter = progress.RateMeter(start, train_steps)
    self._first = None  # (time, step) when the first call returned.

  def __call__(self, step: int) -> None:
    if self._first is None:
      self._first = (time.monotonic(), step)
    if not self._meter.due(self._interval_s):
      return
    rate = self._meter.update(step)
    logging.info('learner: train_step %d/%d  %.1f steps/s  loss %.4g  '
                 'eta %s', step, self._train_steps, rate, self._loss(),
                 self._meter.eta(step))
    self._publisher.publish(train_step=step, train_steps=self._train_steps,
                            steps_per_s=rate, finished=False)

  def overall_rate(self, step: int) -> float:
    """Train steps/s since the first call returned (0 before)."""
    if self._first is None:
      return 0.0
    elapsed = time.monotonic() - self._first[0]
    return (step - self._first[1]) / elapsed if elapsed > 0 else 0.0


def _table_state(addresses: Sequence[str]) -> str:
  states = []
  for address in addresses:
    where = f' at {address}' if len(addresses) > 1 else ''
    try:
      info = reverb.Client(address).server_info(timeout=5)
      table = info[table_names.REPLAY_TABLE]
      states.append(
          f'{table_names.REPLAY_TABLE}{where} holds {table.current_size} '
          'items; ' + str(table.rate_limiter_info).replace('\n', ' ')[:200])
    except Exception as e:  # pylint: disable=broad-except
      states.append(f'replay server{where} not answering '
                    f'({type(e).__name__})')
  return ' | '.join(states)


class Heartbeat:
  """Logs why training is stuck when train_step stops moving for a while,
  and replay shards that stop or start answering.

  Sampling can block inside TensorFlow, e.g. while the replay server is away
  (Reverb reconnects on its own once it is back); this thread keeps such a
  wait visible in the log: it is what reports a learner starved of data.
  """

  def __init__(self, replay_addresses: Sequence[str],
               train_step: tf.Variable, interval_s: float = 30.0):
    self._addresses = replay_addresses
    self._train_step = train_step
    self._interval_s = interval_s
    self._up = {}
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self) -> 'Heartbeat':
    self._thread.start()
    return self

  def stop(self) -> None:
    self._done.set()

  def _shards_answering(self):
    """With replay shards: logs a shard that stops or starts answering.

    The pipeline samples the shards that answer and takes a shard that comes
    back in again by itself; this makes both visible.
    """
    if len(self._addresses) < 2:
      return
    for address in self._addresses:
      try:
        reverb.Client(address).server_info(timeout=5)
        up = True
      except Exception:  # pylint: disable=broad-except
        up = False
      if up != self._up.get(address, True):
        if up:
          logging.info('learner: replay shard %s answers again; sampling it '
                       'again', address)
        else:
          logging.warning('learner: replay shard %s not answering; training '
                          'goes on from the other shards', address)
      self._up[address] = up

  def _run(self):
    last_step, still = int(self._train_step.numpy()), 0.0
    while not self._done.wait(self._interval_s):
      self._shards_answering()
      step = int(self._train_step.numpy())
      if step != last_step:
        last_step, still = step, 0.0
        continue
      still += self._interval_s
      logging.info('learner: waiting for replay data at train_step %d for '
                   '%.0fs: %s', step, still, _table_state(self._addresses))
