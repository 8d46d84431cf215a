"""The evaluator (`python -m actor --mode=eval`): greedy-policy returns over training.

Follows the learner through the variables table: at every `eval_interval`
train steps, and once at the final train_step, it pulls the weights, runs
`num_eval_episodes` with the greedy policy and records AverageReturn and
AverageEpisodeLength to TensorBoard under `<root_dir>/eval` and as a line of
`<root_dir>/eval/metrics.jsonl`, and redraws `<root_dir>/eval/returns.png`.
At the end of training (and every `video_interval` steps, if set) it renders
`video_episodes` greedy episodes into `<root_dir>/eval/step_<N>.mp4`.
"""

import dataclasses
import json
import os
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import reverb
from tf_agents.policies import greedy_policy
from tf_agents.policies import py_tf_eager_policy
from tf_agents.train import actor as tfa_actor
from tf_agents.train.utils import train_utils

from actor import env_processes
from actor import eval_outputs
from common import agents
from common import config as config_lib
from common import table_names
from common import contract
from common import environments
from common import outputs
from variable_container import VariableContainerClient

EVAL_DIR = 'eval'
METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'returns.png'


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  env_name: str
  root_dir: str
  variable_address: str
  max_train_steps: int
  eval_interval: int = 10000
  num_eval_episodes: int = 20
  agent: config_lib.AgentConfig = config_lib.SacConfig()
  env_options: environments.EnvOptions = environments.EnvOptions()
  server_timeout_s: float = 300.0
  poll_interval_s: float = 1.0
  video_episodes: int = 1
  video_interval: int = 0  # 0: a video at the end of training only.
  video_size: tuple = (480, 360)
  # Where to read the transitions collected so far (the replay tables' insert
  # counts, summed over the shards); empty: not recorded.
  replay_shards: Tuple[str, ...] = ()
  seed: int = 0  # Run seed; the evaluation environment's seed derives from it.
  # The run's contract (cluster_flags.run_contract), checked against each
  # server the weights are read from; None: not checked.
  contract: Optional[Mapping] = None
  # No --variable_address: every replay shard serves the weights; they are
  # read from the first that answers, and from another when it stops.
  variables_on_shards: bool = False
  # An environment step or reset that takes longer ends the evaluator.
  env_step_timeout_s: float = 60.0


def read_metrics(eval_dir: str) -> List[dict]:
  """Rows of metrics.jsonl, earlier runs' included; skips a torn last line."""
  path = os.path.join(eval_dir, METRICS_FILE)
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  return rows


class _EpisodeReturns:
  """An observer keeping each finished episode's undiscounted return and
  length (environment steps, boundaries not counted, as TF-Agents' metrics)."""

  def __init__(self):
    self.returns: List[float] = []
    self.lengths: List[int] = []
    self._current = 0.0
    self._length = 0

  def clear(self) -> None:
    self.returns.clear()
    self.lengths.clear()

  def __call__(self, traj) -> None:
    if traj.is_boundary():
      return
    if traj.is_first():
      self._current, self._length = 0.0, 0
    self._current += float(np.sum(traj.reward))
    self._length += 1
    if traj.is_last():
      self.returns.append(self._current)
      self.lengths.append(self._length)


class _FirstAnswering:
  """The weights of the first server in `addresses` that answers.

  Keeps to that server while it answers and moves on to the next that does
  when it stops (a replay shard lost: every shard serves the weights). With
  none answering, waits on the last one as `VariableContainerClient` waits.
  """

  def __init__(self, addresses: Sequence[str], variables, s: 'EvalSettings',
               should_stop):
    self._addresses = tuple(addresses)
    self._variables = variables
    self._s = s
    self._should_stop = should_stop
    self._containers = {}
    self._current = None
    self._container()

  def _open(self, address: str) -> VariableContainerClient:
    if address not in self._containers:
      container = VariableContainerClient(
          address, self._variables, self._s.server_timeout_s, 'evaluator',
          self._should_stop)
      contract.check(address, self._s.contract, 'evaluator')
      self._containers[address] = container
    return self._containers[address]

  def _container(self) -> VariableContainerClient:
    if len(self._addresses) == 1:
      return self._open(self._addresses[0])
    rest = [a for a in self._addresses if a != self._current]
    for address in ([self._current] if self._current else []) + rest:
      try:
        reverb.Client(address).server_info(timeout=2)
      except Exception:  # pylint: disable=broad-except
        continue
      if address != self._current:
        if self._current is not None:
          logging.warning('evaluator: %s stopped answering; reading the '
                          'weights from %s', self._current, address)
        self._current = address
      return self._open(address)
    return self._open(self._current or self._addresses[0])

  def latest_train_step(self) -> Optional[int]:
    return self._container().latest_train_step()

  def pull_into(self, variables) -> Optional[int]:
    return self._container().pull_into(variables)


def _transitions_inserted(replay_shards: Sequence[str]):
  """Transitions inserted into the replay tables so far (one per agent step)."""
  if not replay_shards:
    return None
  try:
    return sum(
        int(reverb.Client(address).server_info(timeout=5)[
            table_names.REPLAY_TABLE].rate_limiter_info.insert_stats.completed)
        for address in replay_shards)
  except Exception:  # pylint: disable=broad-except
    return None


class _Stopped(Exception):
  """Raised from inside an evaluation when the evaluator is asked to stop."""


def _stop_check(should_stop):
  """An observer that ends a running evaluation on SIGTERM.

  Twenty Minitaur episodes take minutes; a stop must not wait for them.
  """

  def observe(_):
    if should_stop():
      raise _Stopped()
  return observe


def evaluate(s: EvalSettings,
             should_stop: Callable[[], bool] = lambda: False) -> List[dict]:
  """Evaluates until the final train_step is evaluated; returns the rows."""
  eval_dir = outputs.ensure_writable_dir(os.path.join(s.root_dir, EVAL_DIR))
  environments.set_render_size(*s.video_size)
  env = environments.load_environment(s.env_name,
                                     seed=12345 + s.seed * 100000,
                                     options=s.env_options)
  if s.env_step_timeout_s:
    env = env_processes.watched(env, env_processes.StepWatchdog(
        s.env_name, s.env_step_timeout_s))
  train_step = train_utils.create_train_step()
  agent = agents.create_agent(env, s.agent, train_step, s.env_name)
  variables = agents.shared_variables(agent, train_step)
  container = _FirstAnswering(
      s.replay_shards if s.variables_on_shards and s.replay_shards else
      (s.variable_address,), variables, s, should_stop)
  policy = py_tf_eager_policy.PyTFEagerPolicy(
      greedy_policy.GreedyPolicy(agents.greedy_policy(agent, s.agent)),
      use_tf_function=True)
  episode_returns = _EpisodeReturns()
  eval_actor = tfa_actor.Actor(
      env, policy, train_step,
      episodes_per_run=s.num_eval_episodes,
      metrics=tfa_actor.eval_metrics(s.num_eval_episodes),
      summary_dir=eval_dir,
      summary_interval=0,  # Written explicitly after every evaluation.
      observers=[_stop_check(should_stop), episode_returns])
  rows = []
  next_eval = 0
  next_video = s.video_interval
  last_seen = None
  while not should_stop():
    step = container.latest_train_step()
    if step is not None and last_seen is not None and step < last_seen:
      logging.warning('evaluator: the weights went back from train_step %d '
                      'to %d (a learner restored an older checkpoint); next '
                      'evaluation at train_step %d', last_seen, step,
                      next_eval)
    last_seen = step if step is not None else last_seen
    if step is None or (step < next_eval and step < s.max_train_steps):
      time.sleep(s.poll_interval_s)
      continue
    step = container.pull_into(variables)
    agent_steps = _transitions_inserted(s.replay_shards)
    episode_returns.clear()
    started = time.monotonic()
    try:
      eval_actor.run()
    except _Stopped:
      logging.info('evaluator: stopped during the evaluation at train_step '
                   '%d; nothing recorded for it', step)
      break
    results = {m.name: float(m.result()) for m in eval_actor.metrics}
    row = {'train_step': step,
           'AverageReturn': results['AverageReturn'],
           'AverageEpisodeLength': results['AverageEpisodeLength'],
           'ReturnStd': float(np.std(episode_returns.returns)),
           'ReturnMin': float(np.min(episode_returns.returns)),
           'ReturnMax': float(np.max(episode_returns.returns)),
           'num_episodes': len(episode_returns.returns),
           # Environment steps of this evaluation (AverageEpisodeLength times
           # num_episodes).
           'eval_env_steps': int(sum(episode_returns.lengths)),
           # Transitions collected; each is action_repeat environment steps.
           'agent_steps': agent_steps,
           'env_steps': (None if agent_steps is None else
                         agent_steps * s.env_options.action_repeat),
           'eval_seconds': round(time.monotonic() - started, 2),
           'time': time.time()}
    rows.append(row)
    eval_actor.write_metric_summaries()
    eval_actor.summary_writer.flush()
    with open(os.path.join(eval_dir, METRICS_FILE), 'a') as f:
      f.write(json.dumps(row) + '\n')
    logging.info('evaluator: train_step %d  AverageReturn %.2f  '
                 'AverageEpisodeLength %.1f (%d episodes, %.1fs)', step,
                 row['AverageReturn'], row['AverageEpisodeLength'],
                 s.num_eval_episodes, row['eval_seconds'])
    eval_outputs.plot_returns(read_metrics(eval_dir),
                              os.path.join(eval_dir, PLOT_FILE),
                              f'{s.env_name}: greedy policy')
    final = step >= s.max_train_steps
    if s.video_episodes and (final or (
        s.video_interval and step >= next_video)):
      path = os.path.join(eval_dir, f'step_{step:08d}.mp4')
      try:
        frames = eval_outputs.write_video(env, policy, path, s.video_episodes)
        logging.info('evaluator: wrote %s (%d frames)', path, frames)
      except NotImplementedError:
        logging.warning('evaluator: --env=%s cannot render; no video',
                        s.env_name)
      eval_actor.reset()  # The video moved the environment on.
      if s.video_interval:
        next_video = (step // s.video_interval + 1) * s.video_interval
    if final:
      break
    next_eval = (step // s.eval_interval + 1) * s.eval_interval
  env.close()
  return rows
