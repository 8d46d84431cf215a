"""The learner's main loop: sample the replay table, train SAC, push weights.

Owns the agent's trainable state. Everything periodic is a trigger: TF-Agents'
`Learner` checkpoints and saves policies; this loop adds weight pushes and
progress lines.
"""

import dataclasses
import math
import os
import threading
import time
from typing import Callable, Sequence, Tuple

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.train import learner as tfa_learner
from tf_agents.train import triggers
from tf_agents.train.utils import train_utils

from common import agents
from common import config as config_lib
from common import environments
from common import outputs
from common import process
from common import progress
from common import reverb_connection
from common.errors import UserError
from learner import dataset as dataset_lib
from learner import priorities as priorities_lib
from variable_container import VariableContainerClient


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
      table = info[config_lib.REPLAY_TABLE]
      states.append(
          f'{config_lib.REPLAY_TABLE}{where} holds {table.current_size} '
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

  for address, info in zip(s.shards, _wait_for_shards(s, should_stop)):
    reverb_connection.check_table_signature(
        info, config_lib.REPLAY_TABLE, agents.replay_signature(agent),
        address)
  malloc = process.allocator()
  logging.info('learner: memory allocator %s%s', malloc,
               ' (apt-get install libjemalloc2 for a faster input pipeline)'
               if malloc == 'system' else '')
  if len(s.shards) > 1:
    logging.info('learner: samples from %d replay shards: %s',
                 len(s.shards), ', '.join(s.shards))
  variables = agents.shared_variables(agent, train_step)
  container = VariableContainerClient(
      s.variable_address, variables, s.server_timeout_s, 'learner',
      should_stop)

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
        s.shards, config_lib.REPLAY_TABLE, agent.collect_data_spec,
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

  saved_model_dir = os.path.join(s.root_dir,
                                 tfa_learner.POLICY_SAVED_MODEL_DIR)
  learner = tfa_learner.Learner(
      s.root_dir,
      train_step,
      agent,
      experience_dataset_fn,
      triggers=[
          triggers.PolicySavedModelTrigger(
              saved_model_dir, agent, train_step,
              interval=s.policy_save_interval, save_collect_policy=False),
      ],
      checkpoint_interval=s.checkpoint_interval_steps,
      summary_interval=s.summary_interval,
      strategy=strategy,
      after_train_strategy_step_fn=(
          updater.send_from_train_step if updater else None))
  start_step = int(learner.train_step_numpy)
  if start_step:
    logging.info('learner: resumed from checkpoint at train_step %d',
                 start_step)
  published = container.latest_train_step()
  if published is not None and published > start_step:
    # This learner's weights are the truth (e.g. restored from an older
    # checkpoint, or a fresh --root_dir): the version goes back with them.
    logging.warning('learner: the weights in %s are from train_step %d; '
                    'replacing them with this learner\'s, train_step %d '
                    '(the weight version goes back)', s.variable_address,
                    published, start_step)
  container.push(variables)
  logging.info('learner: pushed initial weights (train_step %d); training to '
               '%d steps, batch %d over %d replica(s)', start_step,
               s.train_steps, s.agent.batch_size, replicas)

  meter = progress.RateMeter(start_step, s.train_steps)
  step, last_push, loss = start_step, start_step, float('nan')
  first_step, t_first = None, None
  iterator = None  # None: the Learner's own.
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
        _wait_for_shards(s, should_stop)
        step = int(learner.train_step_numpy)
        iterator = new_iterator()
        continue
      except tf.errors.OutOfRangeError:
        # The pipeline waits through any shortage of data and ends only on
        # a stop request.
        step = int(learner.train_step_numpy)
        if not should_stop():
          iterator = new_iterator()
        continue
      loss = float(loss_info.loss.numpy())
      step = int(learner.train_step_numpy)
      # Checked before any push: non-finite weights never reach the actors.
      if not math.isfinite(loss):
        raise UserError(f'loss became {loss} at train_step {step}; '
                        'lower the learning rates or reward scale')
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
      logging.info('learner: %d priority updates written, %d dropped',
                   updater.updated, updater.dropped)

  # Final state: checkpoint (so a restart resumes here) and push (so actors
  # and the evaluator see the last weights and the final train_step).
  learner._checkpointer.save(train_step)  # pylint: disable=protected-access
  container.push(variables)
  elapsed = time.monotonic() - t_first if t_first else 0.0
  rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
  logging.info('learner: finished at train_step %d (started at %d); loss '
               '%.4g; %.1f train steps/s', step, start_step, loss, rate)
  return LearnerResult(step, start_step, loss, rate)
