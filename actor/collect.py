"""The collecting actor (`python -m actor`): its set-up and its main loop.

A random initial share, then the collect policy with pulled weights. Owns a
batch of environments (in this process, or in subprocesses with
`env_processes` > 1; stepped by `actor.env_loop`) and a local copy of the
collect policy, run in NumPy where the agent has one (a TF policy call per
step cost a quarter of an environment step). Weights arrive over Reverb from
the variable container; experience leaves over Reverb into the replay table.
The loop pulls the newest weights and acts with them for
`pull_interval_steps`; what happens around that (the done check, the max
priority, summaries, the progress line) is a trigger (`actor.triggers`). It
ends when the learner's train_step (read from the variables table) reaches
`max_train_steps`, or on SIGTERM.
"""

import dataclasses
import os
from typing import Callable

from absl import logging
import reverb

from actor import actor_index
from actor import env_loop
from actor import env_processes
from actor import triggers
from actor.writer import CollectionStopped
from actor.writer import StoppableTrajectoryObserver
from common import agents
from common import build as build_lib
from common import config as config_lib
from common import outputs
from common import reverb_connection
from common import seeds
from common import table_names
from variable_container import contract
from variable_container import one_value
from variable_container.client import VariableContainerClient


def initial_collect_share(total: int, num_actors: int, task: int) -> int:
  """This actor's part of `total` random steps; the parts sum to `total`."""
  return total // num_actors + (1 if task % num_actors < total % num_actors
                                else 0)


def collect(s: config_lib.CollectConfig,
            should_stop: Callable[[], bool] = lambda: False) -> int:
  """Collects until training ends or `should_stop()`; returns env steps."""
  who = 'actor' if s.task is None else f'actor {s.task}'
  outputs.ensure_writable_dir(s.root_dir)
  shards = s.replay_shards or (s.replay_address,)
  task = s.task
  if task is None:
    task = actor_index.claim_actor_id(shards, s.server_timeout_s,
                                      should_stop)
    who = f'actor {task}'
    logging.info('%s: took index %d from %s', who, task,
                 shards[table_names.shard_of(task, len(shards))])
  # The index is renewed from the moment it is taken, on the shard that
  # handed it out (also a fixed --task: it stays out of what that shard hands
  # out); an actor that dies lets it expire there.
  write_address = shards[table_names.shard_of(task, len(shards))]
  lease = actor_index.ActorLease(write_address, task).start()
  try:
    return _connect_and_collect(s, should_stop, who, task, write_address)
  finally:
    lease.stop()


def _connect_and_collect(s: config_lib.CollectConfig, should_stop, who, task,
                         write_address) -> int:
  shards = s.replay_shards or (s.replay_address,)
  if len(shards) > 1:
    logging.info('%s: writes to replay shard %d of %d at %s', who,
                 shards.index(write_address), len(shards), write_address)
  info = reverb_connection.wait_for_server(
      write_address, s.server_timeout_s, who, should_stop)
  env = _environments(s, who, task)
  try:
    return _collect(s, should_stop, who, task, info, write_address, env)
  finally:
    env.close()


def _environments(s: config_lib.CollectConfig, who: str, task: int):
  """One batch of environments (`envs_per_actor` in this process, or in each
  of `env_processes` subprocesses) behind one policy call per step."""
  n = s.envs_per_actor * s.env_processes
  env_seeds = [seeds.derive(s.seed, 'actor', task, 'env', i)
               for i in range(n)]
  if s.env_processes <= 1:
    return env_processes.InProcessEnvironments(
        s.env_name, env_seeds, s.env_options,
        step_timeout_s=s.env_step_timeout_s)
  logging.info('%s: steps %d environments in %d subprocesses', who, n,
               s.env_processes)
  per_process = s.envs_per_actor
  return env_processes.EnvironmentProcesses(
      s.env_name, [env_seeds[k * per_process:(k + 1) * per_process]
                   for k in range(s.env_processes)], s.env_options,
      step_timeout_s=s.env_step_timeout_s)


def _collect(s: config_lib.CollectConfig, should_stop, who, task, info,
             write_address, env) -> int:
  """The random initial share, then the loop with pulled weights."""
  collection = _Collection(s, should_stop, who, task, info, write_address,
                           env)
  try:
    collection.random_initial_collect()
    collection.collect_with_weights()
  except CollectionStopped:
    pass
  finally:
    # Items of unfinished chunks go out now (or are dropped, if the table
    # no longer takes any), and no writer is left to its destructor.
    for observer in collection.observers:
      observer.close()
  collection.log_end('stop requested' if should_stop() else
                     'training finished')
  return collection.collector.env_steps


def _collect_config(s: config_lib.CollectConfig, who: str,
                    task: int) -> config_lib.AgentConfig:
  """This actor's agent config: per-actor exploration (e.g. Ape-X's
  epsilons) lives in the agent's config."""
  collect_config = agents.collect_config(s.agent, task, s.num_actors)
  for field in dataclasses.fields(collect_config):
    value = getattr(collect_config, field.name)
    if value != getattr(s.agent, field.name):
      logging.info('%s: collects with %s=%s (actor %d of %d)', who,
                   field.name, value, task, s.num_actors)
  return collect_config


class _Collection:
  """One actor's collection: its agent and weights, a writer per
  environment, the batch's stepping and the triggers around it."""

  def __init__(self, s: config_lib.CollectConfig, should_stop, who: str,
               task: int, info, write_address: str, env):
    self._s, self._who, self._task = s, who, task
    # After the environment has loaded: a misspelt --env is named as such.
    contract.check(write_address, s.contract, who, server_info=info)
    self.collect_config = _collect_config(s, who, task)
    built = build_lib.build(s.env_name, self.collect_config, s.env_options,
                            env=env)
    self.agent, self.variables = built.agent, built.variables
    reverb_connection.check_table_signature(
        info, table_names.REPLAY_TABLE,
        agents.replay_signature(self.agent, s.replay_layout), write_address)
    # With variables on every shard, this actor reads its own write shard:
    # the loss of another shard (the first included) does not stop it.
    self.container = VariableContainerClient(
        write_address if s.variables_on_shards else s.variable_address,
        self.variables, s.server_timeout_s, who, should_stop)
    self.done = triggers.DoneCheck(self.container, s.max_train_steps,
                                   should_stop, s.done_check_interval_s)
    client = reverb.Client(write_address)
    item_length = agents.sequence_length(self.agent)
    self.observers = [
        StoppableTrajectoryObserver(client, self.done, item_length, who=who)
        for _ in range(env.batch_size)]
    self.env = env
    self.collector = env_loop.Collector(env, self.observers)
    self.progress = triggers.ProgressLog(who, self.collector, env,
                                         s.log_interval_s)
    self.progress.weights_step = self.container.latest_train_step()
    self.refresh_priority = self._priority_refresh(info, write_address,
                                                   client)

  def _priority_refresh(self, info, write_address: str,
                        client: reverb.Client) -> Callable[[], None]:
    if table_names.MAX_PRIORITY_TABLE not in info:
      return lambda: None  # A uniform table.
    s = self._s
    # The learner publishes the max priority on the first shard, and with
    # variables on every shard, on every shard.
    priority_client = (
        client if s.variables_on_shards or write_address == s.replay_address
        else reverb.Client(s.replay_address))
    return triggers.PriorityRefresh(
        lambda: one_value.read_max_priority(priority_client), self.observers,
        self._who)

  def random_initial_collect(self) -> None:
    """Fills the table before the first train step; a rejoining actor (the
    learner is past step 0) skips it."""
    s = self._s
    share = initial_collect_share(s.initial_collect_steps, s.num_actors,
                                  self._task)
    if not share or self.progress.weights_step:
      return
    logging.info('%s: random initial collect of %d steps', self._who, share)
    act = env_loop.random_act(
        self.env.action_spec(),
        seed=seeds.derive(s.seed, 'actor', self._task, 'random'))
    while self.collector.env_steps < share and not self.done():
      self.collector.run(act, min(share, s.pull_interval_steps))
      self.progress('random')
    for observer in self.observers:
      observer.discard_partial_episode()
    self.collector.reset()  # The collect policy starts new episodes.

  def _policy(self):
    """(act, refresh): the collect policy and what takes in pulled weights."""
    numpy_policy = agents.numpy_collect_policy(
        self.agent, self.collect_config,
        seed=seeds.derive(self._s.seed, 'actor', self._task, 'policy'))
    if numpy_policy is not None:
      env_loop.single_threaded_blas()
      return env_loop.numpy_act(numpy_policy), numpy_policy.refresh
    logging.info('%s: no NumPy collect policy for %s; acting through '
                 'TensorFlow', self._who, type(self.collect_config).__name__)
    return (env_loop.tf_act(agents.collect_policy(self.agent,
                                                  self.collect_config)),
            lambda: None)

  def collect_with_weights(self) -> None:
    """The loop: the newest weights, then `pull_interval_steps` with them."""
    s = self._s
    act, refresh_policy = self._policy()
    stats = env_loop.EpisodeStats(self.env.batch_size)
    summaries = triggers.ActorSummaries(
        os.path.join(s.root_dir, f'actor_{self._task}'), stats,
        s.pull_interval_steps, lambda: self.progress.meter.rate)
    rollback = triggers.RollbackCheck(self._who)
    try:
      while not self.done():
        newest = self.container.pull_into(self.variables)
        if newest is None or newest >= s.max_train_steps:
          break
        refresh_policy()
        acted = rollback.last_step
        if rollback(newest, 'acting with them'):
          acted = None
          summaries.restart()
        # How far behind the newest weights this actor was acting.
        lag = newest - acted if acted is not None else 0
        self.progress.weights_step = newest
        self.refresh_priority()
        self.collector.run(act, s.pull_interval_steps, stats)
        summaries(newest, lag)
        self.progress('collect')
    finally:
      summaries.flush()

  def log_end(self, reason: str) -> None:
    logging.info('%s: %s; %d env steps, %d episodes, %d resets, last acted '
                 'with weights of train_step %s, %.0fs blocked by the rate '
                 'limiter', self._who, reason, self.collector.env_steps,
                 self.env.episodes, self.env.resets,
                 self.progress.weights_step,
                 sum(o.blocked_s for o in self.observers))
