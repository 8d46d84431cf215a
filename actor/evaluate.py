"""The evaluator (`python -m actor --mode=eval`): greedy-policy returns over training.

Follows the learner through the variables table: at every `eval_interval`
train steps, and once at the final train_step, it pulls the weights, runs
`num_eval_episodes` with the greedy policy and records AverageReturn and
AverageEpisodeLength to TensorBoard under `<root_dir>/eval` and as a line of
`<root_dir>/eval/metrics.jsonl`, and redraws `<root_dir>/eval/returns.png`.
At the end of training (and every `video_interval` steps, if set) it renders
`video_episodes` greedy episodes into `<root_dir>/eval/step_<N>.mp4`.
After every evaluation it publishes its status (`variable_container.status`)
to the servers it reads the weights from, for the launcher's progress line.
What happens after an evaluation is a trigger (`actor.triggers`).
"""

import json
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import reverb
from tf_agents.policies import greedy_policy
from tf_agents.policies import py_policy
from tf_agents.policies import py_tf_eager_policy
from tf_agents.train import actor as tfa_actor
from tf_agents.trajectories import policy_step

from actor import env_loop
from actor import env_processes
from actor import triggers
from common import agents
from common import build as build_lib
from common import config as config_lib
from common import environments
from common import outputs
from common import seeds
from variable_container import contract
from variable_container import status
from variable_container.client import VariableContainerClient

EVAL_DIR = 'eval'
METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'returns.png'
# Videos of an environment with no known control rate (a custom one).
DEFAULT_VIDEO_FPS = 30


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


class FirstAnswering:
  """The weights of the first server in `addresses` that answers.

  Keeps to that server while it answers and moves on to the next that does
  when it stops (a replay shard lost: every shard serves the weights). With
  none answering, waits on the last one as `VariableContainerClient` waits.
  """

  def __init__(self, addresses: Sequence[str], variables,
               s: config_lib.EvalConfig,
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


def _weights_addresses(s: config_lib.EvalConfig) -> Tuple[str, ...]:
  """Where the weights are read (and the status published)."""
  if s.variables_on_shards and s.replay_shards:
    return tuple(s.replay_shards)
  return (s.variable_address,)


def _row(step: int, results: dict, episodes: _EpisodeReturns,
         agent_steps: Optional[int], action_repeat: int,
         started: float) -> dict:
  """One evaluation's line of metrics.jsonl."""
  return {'train_step': step,
          'AverageReturn': results['AverageReturn'],
          'AverageEpisodeLength': results['AverageEpisodeLength'],
          'ReturnStd': float(np.std(episodes.returns)),
          'ReturnMin': float(np.min(episodes.returns)),
          'ReturnMax': float(np.max(episodes.returns)),
          'num_episodes': len(episodes.returns),
          # Environment steps of this evaluation (AverageEpisodeLength times
          # num_episodes).
          'eval_env_steps': int(sum(episodes.lengths)),
          # Transitions collected; each is action_repeat environment steps.
          'agent_steps': agent_steps,
          'env_steps': (None if agent_steps is None else
                        agent_steps * action_repeat),
          'eval_seconds': round(time.monotonic() - started, 2),
          'time': time.time()}


class _NumpyPyPolicy(py_policy.PyPolicy):
  """A NumPy greedy policy (`agents.numpy_greedy_policy`) as the PyPolicy
  TF-Agents' Actor and the video take, one unbatched time step at a time."""

  def __init__(self, time_step_spec, action_spec, act):
    super().__init__(time_step_spec, action_spec)
    self._act = act

  def _action(self, time_step, policy_state):
    observation = np.asarray(time_step.observation)[None]
    return policy_step.PolicyStep(self._act(observation)[0], policy_state, ())


class _Evaluation:
  """The greedy policy on one environment, `num_eval_episodes` at a time,
  with the weights of the variable container (or the first shard that
  answers)."""

  def __init__(self, s: config_lib.EvalConfig, eval_dir: str, should_stop):
    self._s = s
    environments.set_render_size(*s.video_size)
    built = build_lib.build(s.env_name, s.agent, s.env_options,
                            seed=seeds.derive(s.seed, 'evaluator', 'env'),
                            keep_env=True)
    self.env = built.env
    if s.env_step_timeout_s:
      self.env = env_processes.watched(self.env, env_processes.StepWatchdog(
          s.env_name, s.env_step_timeout_s))
    self.variables = built.variables
    self.weights = FirstAnswering(_weights_addresses(s), self.variables, s,
                                  should_stop)
    numpy_greedy = agents.numpy_greedy_policy(built.agent, s.agent)
    if numpy_greedy is not None:
      # The same greedy actions without a TF call per step: evaluations
      # take a core beside the actors and the learner for minutes.
      env_loop.single_threaded_blas()
      self.policy = _NumpyPyPolicy(self.env.time_step_spec(),
                                   self.env.action_spec(), numpy_greedy)
      self._refresh = numpy_greedy.refresh
    else:
      self.policy = py_tf_eager_policy.PyTFEagerPolicy(
          greedy_policy.GreedyPolicy(agents.greedy_policy(built.agent,
                                                          s.agent)),
          use_tf_function=True)
      self._refresh = lambda: None
    self._episodes = _EpisodeReturns()

    def actor(episodes):
      return tfa_actor.Actor(
          self.env, self.policy, built.train_step, episodes_per_run=episodes,
          metrics=tfa_actor.eval_metrics(episodes), summary_dir=eval_dir,
          summary_interval=0,  # Written explicitly after every evaluation.
          observers=[_stop_check(should_stop), self._episodes])

    self._actors = {s.num_eval_episodes: actor(s.num_eval_episodes)}
    final = s.final_eval_episodes or s.num_eval_episodes
    if final not in self._actors:
      self._actors[final] = actor(final)
    self._final_episodes = final
    self.actor = self._actors[s.num_eval_episodes]  # The last one run.

  def reset(self) -> None:
    """After something else stepped the environment (a video)."""
    for actor in self._actors.values():
      actor.reset()

  def run(self, step: int) -> Optional[dict]:
    """`num_eval_episodes` (at the final train step `final_eval_episodes`)
    with the weights of `step`: their row, or None when a stop came during
    them."""
    agent_steps = status.inserted_items(self._s.replay_shards)
    self._refresh()  # The weights of `step`, just pulled.
    self._episodes.clear()
    started = time.monotonic()
    self.actor = self._actors[self._final_episodes
                              if step >= self._s.max_train_steps else
                              self._s.num_eval_episodes]
    try:
      self.actor.run()
    except _Stopped:
      logging.info('evaluator: stopped during the evaluation at train_step '
                   '%d; nothing recorded for it', step)
      return None
    results = {m.name: float(m.result()) for m in self.actor.metrics}
    return _row(step, results, self._episodes, agent_steps,
                self._s.env_options.action_repeat, started)


def video_fps(s: config_lib.EvalConfig, env) -> float:
  """Frames per second of the evaluator's videos: the control rate, so that
  a video plays at the speed the policy acted (Minitaur at action repeat 4:
  0.01 s x 4, 25 fps)."""
  rate = environments.control_rate_hz(env, s.env_options.action_repeat)
  if rate is None:
    logging.info('evaluator: --env=%s has no known control rate (no dt, '
                 'time step or frame rate); videos at %d fps', s.env_name,
                 DEFAULT_VIDEO_FPS)
    return DEFAULT_VIDEO_FPS
  return rate


def _after_each(s: config_lib.EvalConfig, evaluation: _Evaluation,
                eval_dir: str) -> list:
  """The triggers called with (train_step, row) after every evaluation."""
  return [
      triggers.MetricsRecord(
          lambda: evaluation.actor,
          os.path.join(eval_dir, METRICS_FILE),
          os.path.join(eval_dir, PLOT_FILE), lambda: read_metrics(eval_dir),
          f'{s.env_name}: greedy policy'),
      triggers.StatusPublish(_weights_addresses(s)),
      triggers.Video(evaluation.env, evaluation.policy, eval_dir,
                     s.video_episodes, s.video_interval, s.max_train_steps,
                     s.env_name, after=evaluation.reset,
                     fps=video_fps(s, evaluation.env)),
  ]


def evaluate(s: config_lib.EvalConfig,
             should_stop: Callable[[], bool] = lambda: False) -> List[dict]:
  """Evaluates until the final train_step is evaluated; returns the rows."""
  eval_dir = outputs.ensure_writable_dir(os.path.join(s.root_dir, EVAL_DIR))
  evaluation = _Evaluation(s, eval_dir, should_stop)
  try:
    return evaluate_at_intervals(s, evaluation,
                                 _after_each(s, evaluation, eval_dir),
                                 should_stop, read_metrics(eval_dir))
  finally:
    evaluation.env.close()


def evaluate_at_intervals(s: config_lib.EvalConfig, evaluation: _Evaluation,
                          after_each, should_stop,
                          recorded: Sequence[dict] = ()) -> List[dict]:
  """The loop: wait for the next train step due, evaluate its weights, then
  the triggers; ends after the final train_step. A resumed run (`recorded`:
  the rows already in metrics.jsonl) goes on after its last evaluation
  rather than evaluating the restored weights a second time."""
  rows = []
  schedule = triggers.EvalSchedule(s.eval_interval, s.max_train_steps)
  if recorded and recorded[-1]['train_step'] < s.max_train_steps:
    schedule.evaluated(recorded[-1]['train_step'])
    logging.info('evaluator: %d evaluations recorded, the last at train_step '
                 '%d; next at %d', len(recorded), recorded[-1]['train_step'],
                 schedule.next_step)
  rollback = triggers.RollbackCheck('evaluator')
  while not should_stop():
    step = evaluation.weights.latest_train_step()
    rollback(step, f'next evaluation at train_step {schedule.next_step}')
    if not schedule.due(step):
      time.sleep(s.poll_interval_s)
      continue
    step = evaluation.weights.pull_into(evaluation.variables)
    row = evaluation.run(step)
    if row is None:
      break
    rows.append(row)
    for trigger in after_each:
      trigger(step, row)
    if step >= s.max_train_steps:
      break
    schedule.evaluated(step)
  return rows
