"""The collect loop: random initial share, then the collect policy with pulled weights.

Owns one environment and a local copy of the collect policy. Weights arrive
over Reverb from the variable container; experience leaves over Reverb into
`uniform_table`. The loop ends when the learner's train_step (read from the
variables table) reaches `max_train_steps`, or on SIGTERM.
"""

import dataclasses
import os
import time
from typing import Callable, Optional, Tuple

from absl import logging
import reverb
import tensorflow as tf
from tf_agents.metrics import py_metrics
from tf_agents.policies import py_tf_eager_policy
from tf_agents.environments import batched_py_environment
from tf_agents.environments import wrappers
from tf_agents.policies import random_py_policy
from tf_agents.train import actor as tfa_actor
from tf_agents.train.utils import train_utils

from actor.writer import CollectionStopped
from actor.writer import StoppableTrajectoryObserver
from actor.writer import UnbatchingObserver
from common import agents
from common import config as config_lib
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
  replay_address: str  # The first shard: actor indices, max priority.
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


class _BatchedEagerPolicy(py_tf_eager_policy.PyTFEagerPolicy):
  """A TF policy for already-batched time steps that returns numpy actions.

  `PyTFEagerPolicy(batch_time_steps=False)` hands back tensors, which some
  environments (Minitaur) cannot take: they write into the action array.
  """

  def _action(self, time_step, policy_state, seed=None):
    step = super()._action(time_step, policy_state, seed)
    to_numpy = lambda t: t.numpy() if hasattr(t, 'numpy') else t
    return step._replace(action=tf.nest.map_structure(to_numpy, step.action),
                         info=tf.nest.map_structure(to_numpy, step.info))


def collect_metrics(batch_size: int):
  """TF-Agents' collect metrics, for `batch_size` environments at once."""
  if batch_size == 1:
    return tfa_actor.collect_metrics(10)
  return [py_metrics.NumberOfEpisodes(), py_metrics.EnvironmentSteps(),
          py_metrics.AverageReturnMetric(buffer_size=10, batch_size=batch_size),
          py_metrics.AverageEpisodeLengthMetric(buffer_size=10,
                                                batch_size=batch_size)]


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
  info = reverb_connection.wait_for_server(
      s.replay_address, s.server_timeout_s, who, should_stop)
  task = s.task
  if task is None:
    task = tables.claim_actor_id(s.replay_address, s.server_timeout_s,
                                 should_stop)
    who = f'actor {task}'
    logging.info('%s: took index %d from %s', who, task, s.replay_address)
  shards = s.replay_shards or (s.replay_address,)
  write_address = shards[task % len(shards)]
  if write_address != s.replay_address:
    logging.info('%s: writes to replay shard %d of %d at %s', who,
                 task % len(shards), len(shards), write_address)
    info = reverb_connection.wait_for_server(
        write_address, s.server_timeout_s, who, should_stop)
  # Each environment keeps run statistics; with several, one batched
  # environment steps them together so the policy runs once per batch.
  stats = [wrappers.RunStats(environments.load_environment(
      s.env_name, seed=s.seed * 100000 + task * 1000 + i, options=s.env_options))
           for i in range(s.envs_per_actor)]
  n = s.envs_per_actor
  env = stats[0] if n == 1 else batched_py_environment.BatchedPyEnvironment(
      stats, multithreading=False)
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
      info, config_lib.REPLAY_TABLE, agents.replay_signature(agent),
      write_address)
  container = VariableContainerClient(s.variable_address, variables,
                                      s.server_timeout_s, who, should_stop)
  done = _DoneCheck(container, s.max_train_steps, should_stop,
                    s.done_check_interval_s)
  client = reverb.Client(write_address)
  # The learner publishes the max priority on the first shard.
  first_client = (client if write_address == s.replay_address else
                  reverb.Client(s.replay_address))
  item_length = agents.sequence_length(agent)
  observers = [StoppableTrajectoryObserver(client, done, item_length, who=who)
               for _ in range(n)]
  observer = observers[0] if n == 1 else UnbatchingObserver(observers)
  # A prioritized table: new items enter at the largest priority the learner
  # has written (read with every pull), so each is sampled soon.
  prioritized = config_lib.MAX_PRIORITY_TABLE in info

  def update_priority():
    try:
      priority = tables.read_max_priority(first_client)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('%s: cannot read the max priority (%s); keeping the '
                      'last one', who, type(e).__name__)
      return
    if priority is not None:
      observer.update_priority(priority)
  env_steps = py_metrics.EnvironmentSteps()
  meter = progress.RateMeter()
  weights_step = container.latest_train_step()

  def log_progress(phase):
    if meter.due(s.log_interval_s):
      rate = meter.update(env_steps.result())
      policy = ('random policy' if phase == 'random' else
                f'weights of train_step {weights_step}')
      logging.info('%s: %s  env_steps %d  %.1f env steps/s  episodes %d  '
                   'acting with %s', who, phase, env_steps.result(), rate,
                   sum(e.episodes for e in stats), policy)

  # Tells the server, also after it restarts, that this index is taken
  # (from here on: a process that fails its checks leaves no trace).
  lease = tables.ActorLease(s.replay_address, task).start()
  collect_actor = None
  try:
    # The random initial collect fills the table before the first train step;
    # a rejoining actor (the learner is past step 0) skips it.
    share = initial_collect_share(s.initial_collect_steps, s.num_actors,
                                  task)
    if share and not weights_step:
      logging.info('%s: random initial collect of %d steps', who, share)
      random_actor = tfa_actor.Actor(
          env, random_py_policy.RandomPyPolicy(
              env.time_step_spec(), env.action_spec(),
              outer_dims=(n,) if n > 1 else None),
          train_step, steps_per_run=min(share, s.pull_interval_steps),
          observers=[observer, env_steps])
      while env_steps.result() < share and not done():
        random_actor.run()
        log_progress('random')
      observer.discard_partial_episode()

    collect_policy = agents.collect_policy(agent, collect_config)
    collect_actor = tfa_actor.Actor(
        env,
        py_tf_eager_policy.PyTFEagerPolicy(collect_policy,
                                           use_tf_function=True)
        if n == 1 else _BatchedEagerPolicy(
            collect_policy, use_tf_function=True, batch_time_steps=False),
        train_step,
        steps_per_run=s.pull_interval_steps,
        metrics=collect_metrics(n),
        summary_dir=os.path.join(s.root_dir, f'actor_{task}'),
        summary_interval=s.pull_interval_steps,
        observers=[observer, env_steps])
    acted_step = None
    while not done():
      newest = container.pull_into(variables)
      if newest is None or newest >= s.max_train_steps:
        break
      if acted_step is not None and newest < acted_step:
        # A learner restarted from an older checkpoint: its weights are the
        # truth; the step counts from there again.
        logging.warning('%s: the weights went back from train_step %d to %d '
                        '(a learner restored an older checkpoint); acting '
                        'with them', who, acted_step, newest)
        acted_step = None
      # How far behind the newest weights this actor was acting.
      lag = newest - acted_step if acted_step is not None else 0
      acted_step = weights_step = newest
      if prioritized:
        update_priority()
      collect_actor.run()
      with collect_actor.summary_writer.as_default():
        tf.summary.scalar('Actor/weight_version_lag', lag, step=newest)
        tf.summary.scalar('Actor/env_steps_per_second', meter.rate,
                          step=newest)
      log_progress('collect')
  except CollectionStopped:
    pass
  finally:
    lease.stop()
    if collect_actor is not None:
      collect_actor.summary_writer.flush()
  reason = 'stop requested' if should_stop() else 'training finished'
  logging.info('%s: %s; %d env steps, %d episodes, %d resets, last acted '
               'with weights of train_step %s, %.0fs blocked by the rate '
               'limiter', who, reason, env_steps.result(),
               sum(e.episodes for e in stats), sum(e.resets for e in stats),
               weights_step, observer.blocked_s)
  env.close()
  return int(env_steps.result())
