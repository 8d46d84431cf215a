"""The learner's main loop: sample the replay table, train SAC, push weights.

Owns the agent's trainable state. Everything periodic is a trigger: TF-Agents'
`Learner` trains and writes summaries; `_Saves` checkpoints and saves
policies after the loss and weights are checked (the Learner's own triggers
would fire before the caller sees the loss); this loop adds weight pushes and
progress lines.
"""

import dataclasses
import math
import os
import re
import threading
import time
from typing import Callable, Mapping, Optional, Sequence, Tuple

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.train import learner as tfa_learner
from tf_agents.train import triggers
from tf_agents.train.utils import train_utils

from common import agents
from common import config as config_lib
from common import table_names
from common import contract
from common import environments
from common import outputs
from common import process
from common import progress
from common import reverb_connection
from common.errors import UserError
from learner import dataset as dataset_lib
from learner import priorities as priorities_lib
from learner import run_record
from variable_container import VariableContainerClient
from variable_container import client as variable_client


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
  env_name: str
  root_dir: str
  replay_address: str  # The first shard: max priority.
  variable_address: str
  train_steps: int
  agent: config_lib.AgentConfig = config_lib.SacConfig()
  env_options: environments.EnvOptions = environments.EnvOptions()
  push_interval_steps: int = 100
  iterations_per_call: int = 10
  checkpoint_interval_steps: int = 10000
  policy_save_interval: int = 5000
  summary_interval: int = 100
  server_timeout_s: float = 300.0
  log_interval_s: float = 10.0
  # Prefetched batches: the sampler keeps this many ready ahead of training.
  prefetch_batches: int = 8
  sample_parallel_readers: int = 2
  # A sample waits at most this long for the rate limiter; then the loop
  # regains control (to log why it waits, or to stop) and samples again.
  sample_timeout_ms: int = 1000
  # Added to the reward of every sampled transition after which the episode
  # goes on (discount > 0): a survival bonus in the training objective only.
  alive_bonus: float = 0.0
  # The table is prioritized: train with importance-sampling weights (their
  # exponent annealed from this to 1 over training) and write |TD error|
  # priorities back.
  prioritized: bool = False
  importance_sampling_exponent: float = 0.4
  # Every replay shard (empty: replay_address alone); each batch comes from
  # one of them, all are sampled.
  replay_shards: Tuple[str, ...] = ()
  # Recorded with the checkpoints (run_settings.json): a rerun with another
  # seed is another run.
  seed: int = 0
  # The flags every process of the run must share (cluster_flags
  # .run_contract()), checked against each shard's; None: not checked.
  contract: Optional[Mapping] = None
  # Every replay shard serves the variables (no --variable_address): with
  # several shards, weights and train_step go to each of them.
  variables_on_shards: bool = False

  @property
  def shards(self) -> Tuple[str, ...]:
    return self.replay_shards or (self.replay_address,)


@dataclasses.dataclass
class LearnerResult:
  train_step: int
  start_step: int
  loss: float
  steps_per_second: float


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


def _wait_for_shards(s: 'LearnerSettings', should_stop) -> list:
  """Waits for every replay shard; returns their server infos."""
  return [reverb_connection.wait_for_server(address, s.server_timeout_s,
                                            'learner', should_stop)
          for address in s.shards]


_SUMMARY_WRITE_ERRORS = (tf.errors.ResourceExhaustedError,
                         tf.errors.UnknownError, tf.errors.InternalError,
                         tf.errors.FailedPreconditionError,
                         tf.errors.PermissionDeniedError,
                         tf.errors.NotFoundError)


def _is_summary_write_error(error: Exception) -> bool:
  """The summary writer's flush failed (it raises at the end of `run`)."""
  text = str(error)
  return 'SummaryWriter' in text or 'tfevents' in text


def _numerics_reason(error: Exception) -> str:
  """'Critic loss is inf or nan' from the text of a failed check_numerics."""
  found = re.search(r'(\w[\w ]* is inf or nan)', str(error), re.IGNORECASE)
  return found.group(1) if found else 'inf or nan'


def _wait_for_any_shard(s: 'LearnerSettings', should_stop) -> None:
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


class _Heartbeat:
  """Logs why training is stuck when train_step stops moving for a while,
  and replay shards that stop or start answering.

  Sampling can block inside TensorFlow, e.g. while the replay server is away
  (Reverb reconnects on its own once it is back); this thread keeps such a
  wait visible in the log.
  """

  def __init__(self, replay_addresses: Sequence[str],
               train_step: tf.Variable, interval_s: float = 30.0):
    # Sampling waits inside the input pipeline (it survives waits for data),
    # so this thread is what reports a learner starved of data.
    self._addresses = replay_addresses
    self._train_step = train_step
    self._interval_s = interval_s
    self._up = {}
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self) -> '_Heartbeat':
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


class _Saves:
  """Checkpoints and policy SavedModels at their intervals, as a trigger.

  Called with the train step only after the loss was seen to be finite;
  `run_record.Checkpoints.save` checks the variables too, and the policy is
  saved only after a checkpoint step's check passed or, between, after the
  same check. A failed write is logged and tried again at the next interval.
  """

  def __init__(self, checkpoints: run_record.Checkpoints, policy_saver,
               agent, start_step: int, checkpoint_interval: int,
               policy_interval: int):
    self._checkpoints = checkpoints
    self._policy_saver = policy_saver
    self._agent = agent
    self._intervals = (checkpoint_interval, policy_interval)
    self._last = [start_step, start_step]

  def _due(self, which: int, step: int) -> bool:
    return self._intervals[which] > 0 and (
        step >= self._last[which] + self._intervals[which])

  def __call__(self, train_step: tf.Variable) -> None:
    step = int(train_step.numpy())
    if self._due(0, step):
      self._checkpoints.save(train_step)
      self._last[0] = step
    if self._due(1, step):
      bad = run_record.non_finite_variables(self._agent.variables)
      if bad:
        raise UserError(f'weights became non-finite at train_step {step} '
                        f'({len(bad)} variables, e.g. {bad[0]}); policy not '
                        'saved: lower the learning rates or the reward scale')
      try:
        self._policy_saver(step, force_trigger=True)
      except run_record.WRITE_ERRORS as e:
        logging.error('learner: policy save at train_step %d failed (%s); '
                      'training goes on, the next interval tries again', step,
                      run_record.describe_error(e))
      self._last[1] = step


def _train_with_priorities(agent, s: LearnerSettings):
  """Replaces `agent.train` by a prioritized train step; returns the updater.

  The step takes `(experience, probability, table_size)`, trains with
  importance-sampling weights and returns the per-item |TD errors| in
  `loss_info.extra`, which the updater sends to the table as priorities.
  """
  train_fn = agents.train_with_td_errors(agent, s.agent)
  train_step = agent.train_step_counter

  def prioritized_train(batch):
    experience, probability, table_size = batch
    beta = priorities_lib.annealed_exponent(
        s.importance_sampling_exponent, train_step, s.train_steps)
    weights = priorities_lib.importance_weights(probability, table_size, beta)
    loss_info, td_errors = train_fn(experience, weights)
    return loss_info._replace(extra=(loss_info.extra, td_errors))

  agent.train = prioritized_train
  return priorities_lib.PriorityUpdater(s.shards).start()


def _connect_variables(s: LearnerSettings, variables, should_stop):
  """The client the weights are pushed with: every shard's variables, or the
  one server's (one address, or an explicit --variable_address)."""
  if s.variables_on_shards and len(s.shards) > 1:
    return variable_client.ShardedVariablePusher(
        s.shards, variables, s.server_timeout_s, 'learner', should_stop)
  return VariableContainerClient(
      s.variable_address, variables, s.server_timeout_s, 'learner',
      should_stop)


def train(settings: LearnerSettings, strategy: tf.distribute.Strategy,
          should_stop: Callable[[], bool] = lambda: False) -> LearnerResult:
  """Trains until `settings.train_steps` or `should_stop()`; returns a summary."""
  s = settings
  outputs.ensure_writable_dir(s.root_dir)
  replicas = strategy.num_replicas_in_sync
  if s.agent.batch_size % replicas:
    raise UserError(f'--batch_size={s.agent.batch_size} does not split over '
                    f'{replicas} replicas; use a multiple of {replicas}')
  env = environments.load_environment(s.env_name,
                                     options=s.env_options)
  with strategy.scope():
    train_step = train_utils.create_train_step()
    agent = agents.create_agent(env, s.agent, train_step, s.env_name)
  env.close()
  # Before any server is asked: a --root_dir of another run is refused at once.
  run_settings = run_record.run_settings(
      s.env_name, s.agent, s.env_options, s.prioritized, s.seed,
      s.alive_bonus, agent)
  recorded = run_record.check_recorded(s.root_dir, run_settings)
  if not recorded and not run_record.has_checkpoint(s.root_dir):
    run_record.record(s.root_dir, run_settings)
    recorded = True

  for address, info in zip(s.shards, _wait_for_shards(s, should_stop)):
    reverb_connection.check_table_signature(
        info, table_names.REPLAY_TABLE, agents.replay_signature(agent),
        address)
    contract.check(address, s.contract, 'learner', server_info=info)
  malloc = process.allocator()
  logging.info('learner: memory allocator %s%s', malloc,
               ' (apt-get install libjemalloc2 for a faster input pipeline)'
               if malloc == 'system' else '')
  if len(s.shards) > 1:
    logging.info('learner: samples from %d replay shards: %s',
                 len(s.shards), ', '.join(s.shards))
  variables = agents.shared_variables(agent, train_step)
  container = _connect_variables(s, variables, should_stop)

  per_replica_batch = s.agent.batch_size // replicas
  updater = None
  if s.prioritized:
    if isinstance(strategy, tf.distribute.TPUStrategy):
      raise UserError('--replay=prioritized needs the learner on CPU or GPU '
                      '(its priority updates run on the host); use '
                      '--replay=uniform with --strategy=tpu')
    updater = _train_with_priorities(agent, s)

  def experience_dataset_fn():
    dataset = dataset_lib.experience_dataset(
        s.shards, table_names.REPLAY_TABLE, agent.collect_data_spec,
        per_replica_batch, agents.sequence_length(agent),
        parallel_readers=s.sample_parallel_readers,
        prefetch=s.prefetch_batches,
        rate_limiter_timeout_ms=s.sample_timeout_ms,
        alive_bonus=s.alive_bonus,
        keep_going=lambda: not should_stop())
    if s.prioritized:
      # The train step needs each item's sampling probability.
      dataset = dataset.map(lambda experience, info: (
          (experience, info.probability, info.table_size), info))
    return dataset

  def new_iterator():
    return iter(strategy.distribute_datasets_from_function(
        lambda _: experience_dataset_fn()))

  restored = run_record.choose_checkpoint(s.root_dir)
  try:
    # No triggers and no interval checkpoints of its own: they would fire
    # inside `run`, before this loop sees the loss (`_Saves` does both).
    learner = tfa_learner.Learner(
        s.root_dir,
        train_step,
        agent,
        experience_dataset_fn,
        triggers=[],
        checkpoint_interval=0,
        summary_interval=s.summary_interval,
        strategy=strategy,
        after_train_strategy_step_fn=(
            updater.send_from_train_step if updater else None))
  except (ValueError, TypeError, tf.errors.OpError) as e:
    if restored is None:
      raise
    # The restore inside the Learner: a checkpoint of other networks.
    raise UserError(
        f'cannot restore checkpoint {restored} '
        f'({" ".join(str(e).split())[:200]}): it was written for another '
        f'agent or other networks; give another --root_dir, or delete '
        f'{run_record.train_dir(s.root_dir)} to start afresh') from None
  checkpoints = run_record.Checkpoints(learner, s.root_dir, restored, agent)
  if not recorded:
    run_record.record(s.root_dir, run_settings)
  start_step = int(learner.train_step_numpy)
  if start_step:
    logging.info('learner: resumed from checkpoint at train_step %d',
                 start_step)
  saved_model_dir = os.path.join(s.root_dir,
                                 tfa_learner.POLICY_SAVED_MODEL_DIR)
  try:
    policy_saver = triggers.PolicySavedModelTrigger(
        saved_model_dir, agent, train_step, interval=s.policy_save_interval,
        start=start_step, save_collect_policy=False)
  except run_record.WRITE_ERRORS as e:
    raise UserError(f'cannot write the policy SavedModels to '
                    f'{saved_model_dir} ({" ".join(str(e).split())[:160]}); '
                    'free space under --root_dir or give another one'
                    ) from None
  saves = _Saves(checkpoints, policy_saver, agent, start_step,
                 s.checkpoint_interval_steps, s.policy_save_interval)
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

  meter = progress.RateMeter(start_step, s.train_steps)
  step, last_push, loss = start_step, start_step, float('nan')
  first_step, t_first = None, None
  iterator = None  # None: the Learner's own.
  summary_failures = 0
  heartbeat = _Heartbeat(s.shards, train_step,
                         min(30.0, 3 * s.log_interval_s)).start()
  try:
    while step < s.train_steps and not should_stop():
      iterations = min(s.iterations_per_call, s.train_steps - step,
                       s.push_interval_steps - (step - last_push))
      try:
        loss_info = learner.run(iterations=max(1, iterations),
                                iterator=iterator)
      except (tf.errors.UnavailableError, tf.errors.CancelledError,
              tf.errors.AbortedError) as e:
        logging.warning('learner: lost the replay server at %s (%s); '
                        'waiting for it', ', '.join(s.shards),
                        type(e).__name__)
        _wait_for_any_shard(s, should_stop)
        step = int(learner.train_step_numpy)
        iterator = new_iterator()
        continue
      except _SUMMARY_WRITE_ERRORS as e:
        if not _is_summary_write_error(e):
          raise
        # TensorBoard events (disk full): the steps were trained; their loss
        # goes unchecked, so no save or push until a call returns one.
        summary_failures += 1
        if summary_failures in (1, 10) or summary_failures % 100 == 0:
          logging.error('learner: writing summaries under %s failed (%s); '
                        'training goes on (%d failures)', s.root_dir,
                        run_record.describe_error(e), summary_failures)
        step = int(learner.train_step_numpy)
        continue
      except tf.errors.InvalidArgumentError as e:
        if 'inf or nan' not in str(e).lower():
          raise
        # The agent's own check_numerics on its losses, before the update.
        raise UserError(f'loss became non-finite at train_step '
                        f'{int(learner.train_step_numpy)} '
                        f'({_numerics_reason(e)}); not '
                        f'checkpointed (the last checkpoint is '
                        f'{checkpoints.last_saved}): lower the learning rates '
                        'or reward scale') from None
      except tf.errors.OutOfRangeError:
        # The pipeline waits through any shortage of data and ends only on
        # a stop request.
        step = int(learner.train_step_numpy)
        if not should_stop():
          iterator = new_iterator()
        continue
      loss = float(loss_info.loss.numpy())
      step = int(learner.train_step_numpy)
      # Checked before any save or push: non-finite weights never reach a
      # checkpoint, a policy or the actors.
      if not math.isfinite(loss):
        raise UserError(f'loss became {loss} at train_step {step}; not '
                        f'checkpointed (the last checkpoint is '
                        f'{checkpoints.last_saved}): lower the learning rates '
                        'or reward scale')
      saves(train_step)
      if t_first is None:
        t_first, first_step = time.monotonic(), step
      if step - last_push >= s.push_interval_steps:
        container.push(variables)
        last_push = step
      if meter.due(s.log_interval_s):
        rate = meter.update(step)
        logging.info('learner: train_step %d/%d  %.1f steps/s  loss %.4g  '
                     'eta %s', step, s.train_steps, rate, loss,
                     meter.eta(step))
  finally:
    heartbeat.stop()
    if updater is not None:
      updater.stop()
      logging.info('learner: %d priority updates written, %d dropped%s',
                   updater.updated, updater.dropped,
                   f', {updater.non_finite} non-finite ones never sent'
                   if updater.non_finite else '')

  # Final state: checkpoint (so a restart resumes here) and push (so actors
  # and the evaluator see the last weights and the final train_step). A
  # failed final checkpoint still pushes, then exits non-zero: the run's
  # last state is not on disk.
  final_saved = checkpoints.save(train_step)
  container.push(variables)
  container.flush()
  elapsed = time.monotonic() - t_first if t_first else 0.0
  rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
  logging.info('learner: finished at train_step %d (started at %d); loss '
               '%.4g; %.1f train steps/s', step, start_step, loss, rate)
  if not final_saved:
    raise UserError(f'the final checkpoint at train_step {step} could not be '
                    f'written (see the error above); a rerun resumes from '
                    f'{checkpoints.last_saved}: free space under '
                    f'--root_dir={s.root_dir}')
  return LearnerResult(step, start_step, loss, rate)
