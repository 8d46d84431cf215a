"""The learner's train step, and the calls that run it.

`Learner` is TF-Agents' `Learner` training with a train step function of
the learner's choosing: the agent's own `train(experience)`, or one that
also takes each item's sample info (a prioritized table's step,
`priorities.prioritized_train_step`). The agent is never patched: the step
is given to the Learner through its public `single_train_step`.

`TrainCalls` runs `Learner.run` and survives what a call can meet: a replay
server away, the summary writer's disk full, the end of a pipeline; and
ends training in one line where the agent's own check finds a NaN loss.
"""

import re
from typing import Callable, Optional, Sequence

from absl import logging
import tensorflow as tf
from tf_agents.train import learner as tfa_learner

from common.errors import UserError
from common.errors import op_error_reason
from learner import run_record
from learner import triggers

_LOST_SERVER = (tf.errors.UnavailableError, tf.errors.CancelledError,
                tf.errors.AbortedError)

_SUMMARY_WRITE_ERRORS = (tf.errors.ResourceExhaustedError,
                         tf.errors.UnknownError, tf.errors.InternalError,
                         tf.errors.FailedPreconditionError,
                         tf.errors.PermissionDeniedError,
                         tf.errors.NotFoundError)


class Learner(tfa_learner.Learner):
  """TF-Agents' Learner; with `train_fn`, its steps train with that.

  `train_fn(experience, sample_info) -> LossInfo` runs under the strategy on
  each replica's batch in place of `agent.train(experience)`. The Learner
  still builds the optimizer variables with `agent.train`, so `train_fn`
  must train the agent's own variables with the agent's own optimizers.
  """

  def __init__(self, *args, train_fn: Optional[Callable] = None, **kwargs):
    super().__init__(*args, **kwargs)
    # As the Learner does with `agent.train`: autograph stays out of it.
    self._step_fn = (tf.autograph.experimental.do_not_convert(train_fn)
                     if train_fn is not None else None)

  def single_train_step(self, iterator):
    if self._step_fn is None:
      return super().single_train_step(iterator)
    experience, sample_info = next(iterator)
    return self.strategy.run(self._step_fn, args=(experience, sample_info))


_GROUP_BROKEN = _LOST_SERVER + (tf.errors.DeadlineExceededError,
                                tf.errors.InternalError)


def group_error(error: Exception, step: int,
                last_checkpoint: Optional[str]) -> UserError:
  """The one line that ends a multi-worker learner whose group broke."""
  return UserError(
      f'the learner workers lost one another at train_step {step} '
      f'({type(error).__name__}: {op_error_reason(error)}); every worker '
      'ends: restart all of them '
      f'(they resume from the chief\'s last checkpoint, {last_checkpoint})')


def _is_summary_write_error(error: Exception) -> bool:
  """The summary writer's flush failed (it raises at the end of `run`)."""
  text = str(error)
  return 'SummaryWriter' in text or 'tfevents' in text


def _numerics_reason(error: Exception) -> str:
  """'Critic loss is inf or nan' from the text of a failed check_numerics."""
  found = re.search(r'(\w[\w ]* is inf or nan)', str(error), re.IGNORECASE)
  return found.group(1) if found else 'inf or nan'


class TrainCalls:
  """Sample and train: one `Learner.run` call at a time.

  `run` returns the call's loss, or None where there is none to check (a
  server was lost, the summaries failed, the pipeline ended): then nothing
  may be saved or pushed. `loss` is the last loss that came back.
  """

  def __init__(self, learner: Learner, shards: Sequence[str], root_dir: str,
               new_iterator: Callable, wait_for_any_shard: Callable[[], None],
               last_checkpoint: Callable[[], Optional[str]],
               should_stop: Callable[[], bool], multi_worker: bool = False):
    self._learner = learner
    self._shards = shards
    self._root_dir = root_dir
    self._new_iterator = new_iterator
    self._wait_for_any_shard = wait_for_any_shard
    self._last_checkpoint = last_checkpoint
    self._should_stop = should_stop
    self._multi_worker = multi_worker
    self._iterator = None  # None: the Learner's own.
    self._summary_failures = 0
    self.loss = float('nan')

  def run(self, iterations: int) -> Optional[float]:
    """Trains up to `iterations` (at least 1) steps; their loss, or None."""
    try:
      loss_info = self._learner.run(iterations=max(1, iterations),
                                    iterator=self._iterator)
    except _GROUP_BROKEN as e:
      if not self._multi_worker:
        if not isinstance(e, _LOST_SERVER):
          raise
        return self._lost_server(e)
      # A peer is gone or hangs, or this worker's pipeline lost a server:
      # its peers' collectives cannot complete, so the group ends together.
      raise group_error(e, int(self._learner.train_step_numpy),
                        self._last_checkpoint()) from None
    except _SUMMARY_WRITE_ERRORS as e:
      if not _is_summary_write_error(e):
        raise
      self._summaries_failed(e)
      return None
    except tf.errors.InvalidArgumentError as e:
      if 'inf or nan' not in str(e).lower():
        raise
      # The agent's own check_numerics on its losses, before the update.
      raise triggers.loss_error(
          'non-finite', int(self._learner.train_step_numpy),
          self._last_checkpoint(), _numerics_reason(e)) from None
    except tf.errors.OutOfRangeError:
      # The pipeline waits through any shortage of data and ends only on
      # a stop request.
      if not self._should_stop():
        self._iterator = self._new_iterator()
      return None
    self.loss = float(loss_info.loss.numpy())
    return self.loss

  def _lost_server(self, error: Exception) -> None:
    logging.warning('learner: lost the replay server at %s (%s); '
                    'waiting for it', ', '.join(self._shards),
                    type(error).__name__)
    self._wait_for_any_shard()
    self._iterator = self._new_iterator()
    return None

  def _summaries_failed(self, error: Exception) -> None:
    # TensorBoard events (disk full): the steps were trained; their loss
    # goes unchecked, so no save or push until a call returns one.
    self._summary_failures += 1
    failures = self._summary_failures
    if failures in (1, 10) or failures % 100 == 0:
      logging.error('learner: writing summaries under %s failed (%s); '
                    'training goes on (%d failures)', self._root_dir,
                    run_record.describe_error(error), failures)
