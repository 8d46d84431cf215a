"""The learner's main loop: sample the replay table, train, push weights.

Owns the agent's trainable state. `train` sets the run up in short steps
(`_build`, `_check_shards`, `_connect_variables`, `_make_learner`,
`_restore`, ...), then `_train_loop` reads in one screen: one call of
sampling and training (`train_step.TrainCalls`), then the triggers of
`learner/triggers.py` with the train step: the finite-loss guard,
checkpoints, policy saving, weight pushes and the progress line (also
published to the servers as status data). `_finish` writes the final state.
"""

import atexit
import dataclasses
import os
import shutil
import tempfile
import time
from typing import Callable, Optional, Tuple

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.train import learner as tfa_learner
from tf_agents.train import triggers as tfa_triggers

from common import agents
from common import build as build_lib
from common import compat
from common import config as config_lib
from common import outputs
from common import process
from common import reverb_connection
from common import table_names
from common.errors import UserError
from common.errors import one_line
from learner import dataset as dataset_lib
from learner import priorities as priorities_lib
from learner import run_record
from learner import strategy as strategy_lib
from learner import train_step as train_step_lib
from learner import triggers
from variable_container import client as variable_client
from variable_container import contract
from variable_container import status


@dataclasses.dataclass
class LearnerResult:
  train_step: int
  start_step: int
  loss: float
  steps_per_second: float


def train(settings: config_lib.LearnerConfig, strategy: tf.distribute.Strategy,
          should_stop: Callable[[], bool] = lambda: False) -> LearnerResult:
  """Trains until `settings.train_steps` or `should_stop()`; returns a summary."""
  s = _worker_settings(settings, strategy)
  chief = strategy_lib.worker_index(strategy) == 0
  built, run_settings, recorded = _build(s, strategy)
  _check_shards(s, built.agent, should_stop)
  container = (_connect_variables(s, built.variables, should_stop) if chief
               else _NoPush())
  updater = _priority_updater(s, strategy)
  learner, restored = _make_learner(s, strategy, built, updater, should_stop)
  checkpoints = _restore(s, built, restored, run_settings, recorded)
  # Every worker starts from the chief's (restored) state.
  strategy_lib.broadcast_from_chief(
      strategy, compat.checkpointed_variables(built.agent, built.train_step))
  start_step = int(learner.train_step_numpy)
  policy_saver = _policy_saver(s, built, start_step)
  if chief:
    _push_initial_weights(s, container, built.variables, start_step,
                          strategy.num_replicas_in_sync)
  calls = train_step_lib.TrainCalls(
      learner, s.shards, s.root_dir,
      new_iterator=lambda: _new_iterator(s, strategy, built, should_stop),
      wait_for_any_shard=lambda: _wait_for_any_shard(s, should_stop),
      last_checkpoint=lambda: checkpoints.last_saved, should_stop=should_stop,
      multi_worker=strategy_lib.is_multi_worker(strategy))
  publisher = status.Publisher(
      s.shards + (s.variable_address,) if chief else (), status.LEARNER)
  progress_line = triggers.ProgressLine(s.log_interval_s, start_step,
                                        s.train_steps, lambda: calls.loss,
                                        publisher)
  push = triggers.PushWeights(container, built.variables,
                              s.push_interval_steps, start_step)
  # In this order: nothing non-finite is saved or pushed.
  loop_triggers = [
      triggers.FiniteLoss(lambda: calls.loss, lambda: checkpoints.last_saved),
      triggers.SaveCheckpoint(checkpoints, s.checkpoint_interval_steps,
                              start_step),
      triggers.SavePolicy(policy_saver, built.agent, s.policy_save_interval,
                          start_step),
      push, progress_line]
  heartbeat = triggers.Heartbeat(s.shards, built.train_step,
                                 min(30.0, 3 * s.log_interval_s)).start()
  try:
    try:
      step = _train_loop(s, calls, loop_triggers, push, built.train_step,
                         lambda: strategy_lib.any_worker(strategy,
                                                         should_stop()))
    finally:
      heartbeat.stop()
      _stop_updater(updater)
    return _finish(s, checkpoints, container, built.variables, publisher,
                   progress_line, step, start_step, calls.loss)
  finally:
    publisher.stop()
    # The pipeline, clients and writers are torn down off this thread: one
    # holding a stream to a killed server can block in C++ (the learner
    # would hang after its final checkpoint).
    process.release_in_background(dict(locals()))


def _train_loop(s: config_lib.LearnerConfig, calls: train_step_lib.TrainCalls,
                loop_triggers, push: triggers.PushWeights,
                train_step: tf.Variable, should_stop) -> int:
  """Sample and train, then every trigger; returns the last train step."""
  step = int(train_step.numpy())
  while step < s.train_steps and not should_stop():
    # A call ends where a push is due: the actors get every interval's
    # weights.
    loss = calls.run(min(s.iterations_per_call, s.train_steps - step,
                         push.steps_left(step)))
    step = int(train_step.numpy())
    if loss is None:
      continue  # No loss to check: nothing may be saved or pushed.
    for trigger in loop_triggers:
      trigger(step)
  return step


def _finish(s: config_lib.LearnerConfig, checkpoints: run_record.Checkpoints,
            container, variables, publisher: status.Publisher,
            progress_line: triggers.ProgressLine, step: int, start_step: int,
            loss: float) -> LearnerResult:
  """The final state: checkpoint (so a restart resumes here), push (so actors
  and the evaluator see the last weights and the final train_step), status.

  A failed final checkpoint still pushes, then exits non-zero: the run's
  last state is not on disk.
  """
  final_saved = checkpoints.save()
  container.push(variables)
  container.flush()
  rate = progress_line.overall_rate(step)
  logging.info('learner: finished at train_step %d (started at %d); loss '
               '%.4g; %.1f train steps/s; weights fingerprint %s', step,
               start_step, loss, rate, run_record.fingerprint(variables))
  publisher.publish(train_step=step, train_steps=s.train_steps,
                    steps_per_s=rate, finished=True)
  publisher.flush(timeout_s=5.0)
  if not final_saved:
    raise UserError(f'the final checkpoint at train_step {step} could not be '
                    f'written (see the error above); a rerun resumes from '
                    f'{checkpoints.last_saved}: free space under '
                    f'--root_dir={s.root_dir}')
  return LearnerResult(step, start_step, loss, rate)


class _NoPush:
  """A worker other than the chief pushes nothing (the chief's weights are
  its own: the workers train in lockstep)."""

  def push(self, variables) -> None:
    del variables

  def flush(self) -> None:
    pass


def _worker_settings(s: config_lib.LearnerConfig,
                     strategy: tf.distribute.Strategy
                     ) -> config_lib.LearnerConfig:
  """A worker other than the chief writes its checkpoints, policies and
  summaries (every worker takes part in each save, as TensorFlow asks) to a
  scratch directory of its own: --root_dir is the chief's."""
  index = strategy_lib.worker_index(strategy)
  if strategy_lib.is_multi_worker(strategy):
    logging.info('learner: worker %d of %d%s', index,
                 strategy_lib.num_workers(strategy),
                 ' (the chief: pushes weights, writes under --root_dir)'
                 if index == 0 else '')
  if index == 0:
    return s
  scratch = tempfile.mkdtemp(prefix=f'learner-worker{index}-')
  logging.info('learner: worker %d writes its copies of the checkpoints to '
               '%s (deleted at exit); the chief\'s --root_dir is the run\'s',
               index, scratch)
  atexit.register(shutil.rmtree, scratch, ignore_errors=True)
  return dataclasses.replace(s, root_dir=scratch)


def _build(s: config_lib.LearnerConfig, strategy: tf.distribute.Strategy
           ) -> Tuple[build_lib.Built, dict, bool]:
  """The agent, its run settings, and whether they are recorded already.

  Before any server is asked: a --root_dir of another run is refused at once.
  """
  outputs.ensure_writable_dir(s.root_dir)
  replicas = strategy.num_replicas_in_sync
  if s.agent.batch_size % replicas:
    raise UserError(f'--batch_size={s.agent.batch_size} does not split over '
                    f'{replicas} replicas; use a multiple of {replicas}')
  built = build_lib.build(s.env_name, s.agent, s.env_options,
                          strategy=strategy)
  run_settings = run_record.run_settings(
      s.env_name, s.agent, s.env_options, s.prioritized, s.seed,
      s.alive_bonus, built.agent)
  recorded = run_record.check_recorded(s.root_dir, run_settings)
  if not recorded and not run_record.has_checkpoint(s.root_dir):
    run_record.record(s.root_dir, run_settings)
    recorded = True
  return built, run_settings, recorded


def _wait_for_shards(s: config_lib.LearnerConfig, should_stop) -> list:
  """Waits for every replay shard; returns their server infos."""
  return [reverb_connection.wait_for_server(address, s.server_timeout_s,
                                            'learner', should_stop)
          for address in s.shards]


def _check_shards(s: config_lib.LearnerConfig, agent, should_stop) -> None:
  """Every replay shard answers, with this agent's items and this run's
  contract; logs the allocator and the shards sampled."""
  for address, info in zip(s.shards, _wait_for_shards(s, should_stop)):
    # The contract first: a table of the other --replay_layout is named so.
    contract.check(address, s.contract, 'learner', server_info=info)
    reverb_connection.check_table_signature(
        info, table_names.REPLAY_TABLE,
        agents.replay_signature(agent, s.replay_layout), address)
  malloc = process.allocator()
  logging.info('learner: memory allocator %s%s', malloc,
               ' (apt-get install libjemalloc2 for a faster input pipeline)'
               if malloc == 'system' else '')
  if len(s.shards) > 1:
    logging.info('learner: samples from %d replay shards: %s',
                 len(s.shards), ', '.join(s.shards))


def _wait_for_any_shard(s: config_lib.LearnerConfig, should_stop) -> None:
  """Waits until one replay shard answers (with one shard: that one).

  The pipeline samples the shards that answer, so one that is down must not
  hold up training (nor end it after --server_timeout_s).
  """
  if len(s.shards) == 1:
    _wait_for_shards(s, should_stop)
    return
  start = time.monotonic()
  while True:
    for address in s.shards:
      try:
        reverb.Client(address).server_info(timeout=2)
        return
      except Exception:  # pylint: disable=broad-except
        pass
    if time.monotonic() - start > s.server_timeout_s:
      raise UserError(f'no replay shard of {", ".join(s.shards)} answered '
                      f'within {s.server_timeout_s:g}s; start them or raise '
                      '--server_timeout_s')
    if should_stop():
      raise UserError('stopped while waiting for the replay shards')
    time.sleep(1.0)


def _connect_variables(s: config_lib.LearnerConfig, variables, should_stop):
  """The client the weights are pushed with: every shard's variables, or the
  one server's (one address, or an explicit --variable_address)."""
  if s.variables_on_shards and len(s.shards) > 1:
    return variable_client.ShardedVariablePusher(
        s.shards, variables, s.server_timeout_s, 'learner', should_stop)
  return variable_client.VariableContainerClient(
      s.variable_address, variables, s.server_timeout_s, 'learner',
      should_stop)


def _priority_updater(s: config_lib.LearnerConfig,
                      strategy: tf.distribute.Strategy
                      ) -> Optional[priorities_lib.PriorityUpdater]:
  """With a prioritized table: the thread that writes priorities back."""
  if not s.prioritized:
    return None
  if isinstance(strategy, tf.distribute.TPUStrategy):
    raise UserError('--replay=prioritized needs the learner on CPU or GPU '
                    '(its priority updates run on the host); use '
                    '--replay=uniform with --strategy=tpu')
  return priorities_lib.PriorityUpdater(s.shards).start()


def _stop_updater(updater: Optional[priorities_lib.PriorityUpdater]) -> None:
  if updater is None:
    return
  updater.stop()
  logging.info('learner: %d priority updates written, %d dropped%s',
               updater.updated, updater.dropped,
               f', {updater.non_finite} non-finite ones never sent'
               if updater.non_finite else '')


def _experience_dataset(s: config_lib.LearnerConfig, strategy,
                        built: build_lib.Built,
                        should_stop) -> tf.data.Dataset:
  """One replica's `(experience, sample_info)` batches from every shard."""
  # Workers stop together, between calls (`strategy.any_worker`): a
  # worker's pipeline must not end inside a call its peers are in.
  keep_going = ((lambda: True) if strategy_lib.is_multi_worker(strategy)
                else (lambda: not should_stop()))
  return dataset_lib.experience_dataset(
      s.shards, table_names.REPLAY_TABLE, built.agent.collect_data_spec,
      s.agent.batch_size // strategy.num_replicas_in_sync,
      agents.sequence_length(built.agent),
      parallel_readers=s.sample_parallel_readers,
      prefetch=s.prefetch_batches,
      rate_limiter_timeout_ms=s.sample_timeout_ms,
      alive_bonus=s.alive_bonus,
      keep_going=keep_going)


def _new_iterator(s: config_lib.LearnerConfig, strategy, built: build_lib.Built,
                  should_stop):
  """A fresh pipeline (after a server was lost, or a pipeline ended)."""
  return iter(strategy.distribute_datasets_from_function(
      lambda _: _experience_dataset(s, strategy, built, should_stop)))


def _make_learner(s: config_lib.LearnerConfig, strategy: tf.distribute.Strategy,
                  built: build_lib.Built,
                  updater: Optional[priorities_lib.PriorityUpdater],
                  should_stop) -> Tuple[train_step_lib.Learner, Optional[str]]:
  """TF-Agents' Learner over the pipeline, restored from the newest sound
  checkpoint; returns it and that checkpoint (None: a fresh start)."""
  train_fn = None
  if updater is not None:
    train_fn = priorities_lib.prioritized_train_step(
        built.agent, s.agent, updater, s.importance_sampling_exponent,
        s.train_steps)
  restored = run_record.choose_checkpoint(s.root_dir)
  try:
    # No triggers and no interval checkpoints of its own: they would fire
    # inside `run`, before the loop sees the loss (its triggers do both).
    learner = train_step_lib.Learner(
        s.root_dir, built.train_step, built.agent,
        lambda: _experience_dataset(s, strategy, built, should_stop),
        triggers=[], checkpoint_interval=0,
        summary_interval=s.summary_interval,
        max_checkpoints_to_keep=run_record.MAX_CHECKPOINTS,
        strategy=strategy, train_fn=train_fn)
  except (ValueError, TypeError, tf.errors.OpError) as e:
    if restored is None:
      raise
    # The restore inside the Learner: a checkpoint of other networks.
    raise UserError(
        f'cannot restore checkpoint {restored} ({one_line(e, 200)}): it was '
        'written for another agent or other networks; give another '
        f'--root_dir, or delete {run_record.train_dir(s.root_dir)} to start '
        'afresh') from None
  return learner, restored


def _restore(s: config_lib.LearnerConfig, built: build_lib.Built,
             restored: Optional[str], run_settings: dict,
             recorded: bool) -> run_record.Checkpoints:
  """The checkpoints, once the Learner restored `restored` (checked here);
  the run settings recorded if an older version's checkpoint had none."""
  checkpoints = run_record.Checkpoints(s.root_dir, built.agent,
                                       built.train_step, restored)
  if not recorded:
    run_record.record(s.root_dir, run_settings)
  start_step = int(built.train_step.numpy())
  if start_step:
    logging.info('learner: resumed from checkpoint at train_step %d',
                 start_step)
  return checkpoints


def _policy_saver(s: config_lib.LearnerConfig, built: build_lib.Built,
                  start_step: int) -> tfa_triggers.PolicySavedModelTrigger:
  """TF-Agents' policy SavedModels (written now, if not there yet); their
  weights are saved by `triggers.SavePolicy`."""
  saved_model_dir = os.path.join(s.root_dir,
                                 tfa_learner.POLICY_SAVED_MODEL_DIR)
  try:
    return tfa_triggers.PolicySavedModelTrigger(
        saved_model_dir, built.agent, built.train_step,
        interval=s.policy_save_interval, start=start_step,
        save_collect_policy=False)
  except run_record.WRITE_ERRORS as e:
    raise UserError(f'cannot write the policy SavedModels to '
                    f'{saved_model_dir} ({one_line(e)}); free space under '
                    '--root_dir or give another one') from None


def _push_initial_weights(s: config_lib.LearnerConfig, container, variables,
                          start_step: int, replicas: int) -> None:
  """This learner's weights to the servers before its first step."""
  published = container.latest_train_step()
  if published is not None and published > start_step:
    # This learner's weights are the truth (e.g. restored from an older
    # checkpoint, or a fresh --root_dir): the version goes back with them.
    logging.warning('learner: the weights in %s are from train_step %d; '
                    'replacing them with this learner\'s, train_step %d '
                    '(the weight version goes back)', s.variable_address,
                    published, start_step)
  container.push(variables)
  container.flush()  # Sharded: on every live shard before the first step.
  logging.info('learner: pushed initial weights (train_step %d); training to '
               '%d steps, batch %d over %d replica(s)', start_step,
               s.train_steps, s.agent.batch_size, replicas)
