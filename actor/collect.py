"""The collect loop: random initial share, then the collect policy with pulled weights.

Owns a batch of environments (in this process, or in subprocesses with
`env_processes` > 1) and a local copy of the collect policy, run in NumPy
where the agent has one (a TF policy call per step cost a quarter of an
environment step). Weights arrive over Reverb from the variable container;
experience leaves over Reverb into `uniform_table`. The loop ends when the learner's train_step (read from the
variables table) reaches `max_train_steps`, or on SIGTERM.
"""

import dataclasses
import os
import time
from typing import Callable, Mapping, Optional, Tuple

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.train.utils import train_utils

from actor import collector as collector_lib
from actor import env_processes
from actor.writer import CollectionStopped
from actor.writer import StoppableTrajectoryObserver
from common import actor_indices
from common import agents
from common import config as config_lib
from common import table_names
from common import contract
from common import environments
from common import outputs
from common import progress
from common import reverb_connection
from common import tables
from variable_container import VariableContainerClient


@dataclasses.dataclass(frozen=True)
class ActorSettings:
  env_name: str
  root_dir: str
  replay_address: str  # The first shard: the max priority (without
  # variables on every shard).
  variable_address: str
  max_train_steps: int
  task: Optional[int] = 0  # None: take the next free index from the server.
  num_actors: int = 1
  initial_collect_steps: int = 10000
  pull_interval_steps: int = 100
  envs_per_actor: int = 1
  env_processes: int = 1  # > 1: each environment in its own subprocess.
  agent: config_lib.AgentConfig = config_lib.SacConfig()
  env_options: environments.EnvOptions = environments.EnvOptions()
  server_timeout_s: float = 300.0
  log_interval_s: float = 10.0
  # While blocked by the rate limiter, how often to ask whether training ended.
  done_check_interval_s: float = 5.0
  seed: int = 0  # Run seed; environment seeds derive from it.
  # Every replay shard (empty: replay_address alone); actor i writes to
  # shard i mod S.
  replay_shards: Tuple[str, ...] = ()
  # The run's contract (cluster_flags.run_contract), checked against the
  # write shard's at connect; None: not checked.
  contract: Optional[Mapping] = None
  # No --variable_address: every shard serves the weights and train_step,
  # and this actor reads them (and the max priority) from its write shard.
  variables_on_shards: bool = False
  # An environment step or reset that takes longer ends the actor (exit 2).
  env_step_timeout_s: float = 60.0


def initial_collect_share(total: int, num_actors: int, task: int) -> int:
  """This actor's part of `total` random steps; the parts sum to `total`."""
  return total // num_actors + (1 if task % num_actors < total % num_actors
                                else 0)


class _DoneCheck:
  """`should_stop` for the writer: a stop signal, or training has finished."""

  def __init__(self, container, max_train_steps, should_stop, interval_s):
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


def collect(s: ActorSettings,
            should_stop: Callable[[], bool] = lambda: False) -> int:
  """Collects until training ends or `should_stop()`; returns env steps."""
  who = 'actor' if s.task is None else f'actor {s.task}'
  outputs.ensure_writable_dir(s.root_dir)
  shards = s.replay_shards or (s.replay_address,)
  task = s.task
  if task is None:
    task = actor_indices.claim_actor_id(shards, s.server_timeout_s,
                                        should_stop)
    who = f'actor {task}'
    logging.info('%s: took index %d from %s', who, task,
                 shards[actor_indices.shard_of(task, len(shards))])
  # The index is renewed from the moment it is taken, on the shard that
  # handed it out (also a fixed --task: it stays out of what that shard hands
  # out); an actor that dies lets it expire there.
  write_address = shards[actor_indices.shard_of(task, len(shards))]
  lease = actor_indices.ActorLease(write_address, task).start()
  try:
    return _connect_and_collect(s, should_stop, who, task, write_address)
  finally:
    lease.stop()


def _connect_and_collect(s: ActorSettings, should_stop, who, task,
                         write_address) -> int:
  shards = s.replay_shards or (s.replay_address,)
  if len(shards) > 1:
    logging.info('%s: writes to replay shard %d of %d at %s', who,
                 shards.index(write_address), len(shards), write_address)
  info = reverb_connection.wait_for_server(
      write_address, s.server_timeout_s, who, should_stop)
  # One batch of environments (`envs_per_actor` in this process, or in each
  # of `env_processes` subprocesses) behind one policy call per step.
  n = s.envs_per_actor * s.env_processes
  seeds = [s.seed * 100000 + task * 1000 + i for i in range(n)]
  if s.env_processes > 1:
    logging.info('%s: steps %d environments in %d subprocesses', who, n,
                 s.env_processes)
    env = env_processes.EnvironmentProcesses(
        s.env_name, [seeds[k * s.envs_per_actor:(k + 1) * s.envs_per_actor]
                     for k in range(s.env_processes)], s.env_options,
        step_timeout_s=s.env_step_timeout_s)
  else:
    env = env_processes.InProcessEnvironments(
        s.env_name, seeds, s.env_options, step_timeout_s=s.env_step_timeout_s)
  try:
    return _collect(s, should_stop, who, task, info, write_address, env)
  finally:
    env.close()


def _collect(s: ActorSettings, should_stop, who, task, info, write_address,
             env) -> int:
  # After the environment has loaded: a misspelt --env is named as such.
  contract.check(write_address, s.contract, who, server_info=info)
  n = env.batch_size
  train_step = train_utils.create_train_step()
  # Per-actor exploration (e.g. Ape-X's epsilons) lives in the agent's config.
  collect_config = agents.collect_config(s.agent, task, s.num_actors)
  for field in dataclasses.fields(collect_config):
    value = getattr(collect_config, field.name)
    if value != getattr(s.agent, field.name):
      logging.info('%s: collects with %s=%s (actor %d of %d)', who,
                   field.name, value, task, s.num_actors)
  agent = agents.create_agent(env, collect_config, train_step, s.env_name)
  variables = agents.shared_variables(agent, train_step)
  reverb_connection.check_table_signature(
      info, table_names.REPLAY_TABLE, agents.replay_signature(agent),
      write_address)
  # With variables on every shard, this actor reads its own write shard:
  # the loss of another shard (the first included) does not stop it.
  variable_address = (write_address if s.variables_on_shards else
                      s.variable_address)
  container = VariableContainerClient(variable_address, variables,
                                      s.server_timeout_s, who, should_stop)
  done = _DoneCheck(container, s.max_train_steps, should_stop,
                    s.done_check_interval_s)
  client = reverb.Client(write_address)
  # The learner publishes the max priority on the first shard, and with
  # variables on every shard, on every shard.
  priority_client = (
      client if s.variables_on_shards or write_address == s.replay_address
      else reverb.Client(s.replay_address))
  item_length = agents.sequence_length(agent)
  observers = [StoppableTrajectoryObserver(client, done, item_length, who=who)
               for _ in range(n)]
  collector = collector_lib.Collector(env, observers)
  # A prioritized table: new items enter at the largest priority the learner
  # has written (read with every pull), so each is sampled soon.
  prioritized = table_names.MAX_PRIORITY_TABLE in info

  def update_priority():
    try:
      priority = tables.read_max_priority(priority_client)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: cannot read the max priority (%s); keeping the '
                      'last one', who, type(e).__name__)
      return
    if priority is not None:
      for observer in observers:
        observer.update_priority(priority)
  meter = progress.RateMeter()
  weights_step = container.latest_train_step()

  def log_progress(phase):
    if meter.due(s.log_interval_s):
      rate = meter.update(collector.env_steps)
      policy = ('random policy' if phase == 'random' else
                f'weights of train_step {weights_step}')
      logging.info('%s: %s  env_steps %d  %.1f env steps/s  episodes %d  '
                   'acting with %s', who, phase, collector.env_steps, rate,
                   env.episodes, policy)

  summary_writer = None
  try:
    # The random initial collect fills the table before the first train step;
    # a rejoining actor (the learner is past step 0) skips it.
    share = initial_collect_share(s.initial_collect_steps, s.num_actors,
                                  task)
    if share and not weights_step:
      logging.info('%s: random initial collect of %d steps', who, share)
      act = collector_lib.random_act(env.action_spec(),
                                     seed=_policy_seed(s.seed, task))
      while collector.env_steps < share and not done():
        collector.run(act, min(share, s.pull_interval_steps))
        log_progress('random')
      for observer in observers:
        observer.discard_partial_episode()
      collector.reset()  # The collect policy starts new episodes.

    numpy_policy = agents.numpy_collect_policy(
        agent, collect_config, seed=_policy_seed(s.seed, task) + 1)
    if numpy_policy is not None:
      collector_lib.single_threaded_blas()
      act = collector_lib.numpy_act(numpy_policy)
    else:
      logging.info('%s: no NumPy collect policy for %s; acting through '
                   'TensorFlow', who, type(collect_config).__name__)
      act = collector_lib.tf_act(
          agents.collect_policy(agent, collect_config))
    stats = collector_lib.EpisodeStats(n)
    summary_writer = tf.summary.create_file_writer(
        os.path.join(s.root_dir, f'actor_{task}'), flush_millis=10000)
    last_summary = -s.pull_interval_steps
    acted_step = None
    while not done():
      newest = container.pull_into(variables)
      if newest is None or newest >= s.max_train_steps:
        break
      if numpy_policy is not None:
        numpy_policy.refresh()
      if acted_step is not None and newest < acted_step:
        # A learner restarted from an older checkpoint: its weights are the
        # truth; the step counts from there again.
        logging.warning('%s: the weights went back from train_step %d to %d '
                        '(a learner restored an older checkpoint); acting '
                        'with them', who, acted_step, newest)
        acted_step = None
        last_summary = -s.pull_interval_steps
      # How far behind the newest weights this actor was acting.
      lag = newest - acted_step if acted_step is not None else 0
      acted_step = weights_step = newest
      if prioritized:
        update_priority()
      collector.run(act, s.pull_interval_steps, stats)
      with summary_writer.as_default():
        # TF-Agents' Actor writes its metrics once per summary interval.
        if newest - last_summary >= s.pull_interval_steps:
          stats.write_summaries(newest)
          last_summary = newest
        tf.summary.scalar('Actor/weight_version_lag', lag, step=newest)
        tf.summary.scalar('Actor/env_steps_per_second', meter.rate,
                          step=newest)
      log_progress('collect')
  except CollectionStopped:
    pass
  finally:
    if summary_writer is not None:
      summary_writer.flush()
  reason = 'stop requested' if should_stop() else 'training finished'
  logging.info('%s: %s; %d env steps, %d episodes, %d resets, last acted '
               'with weights of train_step %s, %.0fs blocked by the rate '
               'limiter', who, reason, collector.env_steps, env.episodes,
               env.resets, weights_step, sum(o.blocked_s for o in observers))
  return collector.env_steps


def _policy_seed(seed: int, task: int) -> int:
  """Distinct sampling streams per actor, the same on a rerun."""
  return (seed * 1000003 + task * 7919) % (2**31 - 1)
