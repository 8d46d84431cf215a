"""The actor and the evaluator against faults of their environment and of
the servers (issue 18): episodes that run past their end, hung environments,
leaked and shard-bound `--task=auto` indices, shards that stop answering.

Real Reverb servers on localhost; the actor and the evaluator run as the
real binaries where the behaviour is a process's.
"""

import re
import signal
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.trajectories import time_step as ts

from actor import actor_index
from common import agents
from common import config as config_lib
from common import table_names
from common import environments
from common.errors import UserError
from launcher.local_cluster import TINY, free_port, table_size
from replay_server import actor_indices
from replay_server import tables
from variable_container.client import VariableContainerClient


def _index_server():
  server = reverb.Server([tables.actor_id_table(), tables.actor_lease_table()],
                         port=free_port())
  return server, f'localhost:{server.port}'


def _poll_until(indices, condition, timeout_s=20.0):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, 'condition not reached'
    indices.poll()
    time.sleep(0.2)


def _queue_size(address):
  return reverb.Client(address).server_info(
      timeout=5)[table_names.ACTOR_ID_TABLE].current_size


def test_expired_index_is_handed_out_again_lowest_first():
  """0 and 1 taken; 1 renews, 0 stops: 0 comes back and is handed out
  before the higher free indices that were queued meanwhile."""
  server, address = _index_server()
  try:
    indices = actor_indices.ActorIndices(address, grace_s=0,
                                         lease_timeout_s=2.0)
    _poll_until(indices, lambda: _queue_size(address) > 0)
    assert [actor_index.claim_actor_id(address, 10) for _ in range(2)] == [
        0, 1]
    lease = actor_index.ActorLease(address, 1, interval_s=0.3).start()
    try:
      _poll_until(indices, lambda: indices.held == [1])
      assert actor_index.claim_actor_id(address, 10) == 0
      _poll_until(indices, lambda: 0 in indices.held)
      # Not renewed: 0 expires again, 1 (renewed) never does.
      _poll_until(indices, lambda: indices.held == [1])
      assert actor_index.claim_actor_id(address, 10) == 0
    finally:
      lease.stop()
  finally:
    server.stop()


def test_shards_hand_out_their_residue_class_and_claims_skip_a_dead_one():
  servers = [_index_server() for _ in range(3)]
  addresses = [a for _, a in servers]
  try:
    shards = [actor_indices.ActorIndices(a, grace_s=0, shard=k, num_shards=3)
              for k, a in enumerate(addresses)]
    for k, indices in enumerate(shards):
      _poll_until(indices, lambda a=addresses[k]: _queue_size(a) > 0)
    # Equal queues: the lowest shard; then always the fullest. Shard k hands
    # out k, k + 3, ...
    got = [actor_index.claim_actor_id(addresses, 10) for _ in range(6)]
    assert got == [0, 1, 2, 3, 4, 5], got
    servers[1][0].stop()
    # A dead shard is skipped; the others keep their residue classes.
    claims = [actor_index.claim_actor_id(addresses, 20) for _ in range(4)]
    assert claims == [6, 8, 9, 11], claims
  finally:
    for k, (server, _) in enumerate(servers):
      if k != 1:
        server.stop()


def test_claims_spread_over_shards_that_refill_their_queues():
  """A shard refills its queue within a second of a claim, so its free count
  is back to the others': the next claim goes to the shard that handed out
  fewer (two actors started together once both landed on shard 0)."""
  servers = [_index_server() for _ in range(2)]
  addresses = [a for _, a in servers]
  try:
    shards = [actor_indices.ActorIndices(a, grace_s=0, shard=k, num_shards=2)
              for k, a in enumerate(addresses)]
    got = []
    for _ in range(4):
      for k, indices in enumerate(shards):
        _poll_until(indices, lambda a=addresses[k]: (
            _queue_size(a) == table_names.QUEUE_DEPTH))
      got.append(actor_index.claim_actor_id(addresses, 10))
    assert got == [0, 1, 2, 3], got
  finally:
    for server, _ in servers:
      server.stop()


def test_a_shard_started_without_the_shard_list_is_refused_at_claim():
  """Servers that each think they are the only shard hand out every index:
  two actors would share one; the claim says so in one line instead."""
  servers = [_index_server() for _ in range(2)]
  addresses = [a for _, a in servers]
  try:
    shards = [actor_indices.ActorIndices(a, grace_s=0) for a in addresses]
    for k, indices in enumerate(shards):
      _poll_until(indices, lambda a=addresses[k]: _queue_size(a) > 0)
    assert actor_index.claim_actor_id(addresses, 10) == 0
    with pytest.raises(UserError, match=r'shard 1 \(localhost:\d+\) handed '
                       r'out index 0, which belongs to shard 0: start every '
                       r'replay server with the whole --replay_address list'):
      actor_index.claim_actor_id(addresses, 10)
  finally:
    for server, _ in servers:
      server.stop()


def _server(cluster, env, extra=(), name='replay_server'):
  port = free_port()
  address = f'localhost:{port}'
  flags = [f'--env={env}', f'--replay_address={address}',
           '--rate_limiter=min_size', '--min_size_to_sample=1',
           '--replay_capacity=100000', '--validate_env_episodes=0'] + TINY
  cluster.start(name, 'replay_server', flags + [f'--port={port}'] +
                list(extra))
  return address, flags


def _actor_errors(log):
  return [l for l in log.splitlines() if l.startswith('actor: error:')]


@pytest.mark.parametrize('env_processes', [1, 2])
def test_hung_environment_ends_the_actor_in_one_line(cluster, tmp_path,
                                                     env_processes):
  _, flags = _server(cluster, 'tests.hanging_env:HangingEnv')
  cluster.start('actor', 'actor', flags + [
      '--initial_collect_steps=1000', '--max_train_steps=10',
      '--env_step_timeout_s=2', f'--env_processes={env_processes}',
      f'--root_dir={tmp_path}/a'])
  cluster.wait_for_log('actor', 'random initial collect', 180)
  start = time.monotonic()
  assert cluster.wait('actor', 60) == 2, cluster.tail('actor')
  assert time.monotonic() - start < 30
  log = cluster.log('actor')
  errors = _actor_errors(log)
  assert len(errors) == 1, log[-3000:]
  assert re.search(r'environment tests.hanging_env:HangingEnv( in subprocess '
                   r'\d)?: a step took longer than --env_step_timeout_s=2s',
                   errors[0]), errors
  assert 'Traceback' not in log


def test_sigterm_ends_an_actor_stuck_in_a_step(cluster, tmp_path):
  _, flags = _server(cluster, 'tests.hanging_env:HangingEnv')
  cluster.start('actor', 'actor', flags + [
      '--initial_collect_steps=1000', '--max_train_steps=10',
      '--env_step_timeout_s=600', '--stop_timeout_s=3',
      f'--root_dir={tmp_path}/a'])
  cluster.wait_for_log('actor', 'random initial collect', 180)
  time.sleep(1)  # Into the hung step (30 steps take milliseconds).
  cluster.signal('actor', signal.SIGTERM)
  start = time.monotonic()
  code = cluster.wait('actor', 30)
  assert code != 0 and time.monotonic() - start < 15, cluster.tail('actor')
  assert 'still running 3s after SIGTERM' in cluster.log('actor')


def test_restarted_auto_actor_gets_its_index_back(cluster, tmp_path):
  """An actor killed and restarted, again and again, is handed index 0
  again (its old lease expired) instead of 1, 2, 3, ..."""
  _, flags = _server(cluster, 'Pendulum-v1', [
      '--actor_lease_timeout_s=4', '--actor_lease_grace_s=1'])
  actor = flags + ['--task=auto', '--initial_collect_steps=100000',
                   '--max_train_steps=10', f'--root_dir={tmp_path}/a']
  taken = []
  for attempt in range(4):
    name = f'actor_{attempt}'
    cluster.start(name, 'actor', actor)
    taken.append(int(cluster.wait_for_log(name, r'took index (\d+) from',
                                          120).group(1)))
    cluster.wait_for_log(name, 'random initial collect', 120)
    cluster.procs[name].kill()
    cluster.wait(name, 10)
    # The server hands the dead actor's index back once its lease expires
    # (a restart before then rightly gets another one).
    back = len(re.findall(r'handing back \[?%d\b' % taken[-1],
                          cluster.log('replay_server')))
    deadline = time.monotonic() + 60
    while len(re.findall(r'handing back \[?%d\b' % taken[-1],
                         cluster.log('replay_server'))) <= back:
      assert time.monotonic() < deadline, cluster.tail('replay_server')
      time.sleep(0.5)
  assert taken == [0, 0, 0, 0], taken


def test_actor_and_evaluator_refuse_another_gamma(cluster, tmp_path):
  address, flags = _server(cluster, 'Pendulum-v1')
  cluster.start('actor', 'actor', flags + [
      '--gamma=0.9', '--max_train_steps=10', f'--root_dir={tmp_path}/a'])
  cluster.start('evaluator', 'actor', flags + [
      '--mode=eval', '--gamma=0.9', '--max_train_steps=10',
      f'--root_dir={tmp_path}/e'])
  want = (f'--gamma=0.9 here, but the replay server at {address} runs '
          '--gamma=0.99')
  for name in ('actor', 'evaluator'):
    assert cluster.wait(name, 180) == 2, cluster.tail(name)
    errors = _actor_errors(cluster.log(name))
    assert len(errors) == 1 and want in errors[0], cluster.tail(name)


_CARD_GAME = 'tests.tutorial_card_game:CardGameEnv'


class _Recorder:
  def __init__(self):
    self.trajectories = []

  def __call__(self, traj):
    self.trajectories.append(traj)


def _episodes(trajectories):
  """(return, length) of each finished episode; asserts every LAST is
  followed by the next episode's FIRST."""
  episodes, ret, length = [], 0.0, 0
  for traj in trajectories:
    if traj.step_type == ts.StepType.LAST:
      # The step after LAST must start a new episode (a boundary).
      assert traj.next_step_type == ts.StepType.FIRST, traj
      continue
    if traj.step_type == ts.StepType.FIRST:
      ret, length = 0.0, 0
    ret += float(traj.reward)
    length += 1
    if traj.next_step_type == ts.StepType.LAST:
      episodes.append((ret, length))
  return episodes


@pytest.mark.parametrize('env_name', [_CARD_GAME, 'CartPole-v0'])
def test_collector_ends_every_episode_at_its_last_step(env_name):
  """The tutorial's card game steps on past LAST; CartPole (gym) resets
  itself: either way every LAST is followed by a reset, the boundary is no
  step, and nothing is reset twice."""
  from actor import env_loop  # pylint: disable=g-import-not-at-top
  from actor import env_processes  # pylint: disable=g-import-not-at-top
  envs = env_processes.InProcessEnvironments(env_name, [1, 2],
                                             config_lib.EnvOptions())
  recorders = [_Recorder(), _Recorder()]
  collector = env_loop.Collector(envs, recorders)
  # Always draw (0) in the card game: busts, and the tutorial's game then
  # draws on. CartPole: always push left.
  act = lambda time_steps: (np.zeros(len(time_steps), np.int64), ())
  collector.run(act, 400)
  episodes = [e for r in recorders for e in _episodes(r.trajectories)]
  assert len(episodes) >= 20
  assert all(length > 0 for _, length in episodes), episodes
  if env_name == _CARD_GAME:
    assert all(-21 <= ret <= 0 for ret, _ in episodes), episodes
  steps = sum(1 for r in recorders for t in r.trajectories
              if t.step_type != ts.StepType.LAST)
  assert collector.env_steps == steps
  # One reset per episode: the first ones, then one after each LAST.
  assert envs.episodes == len(episodes)
  # Two first resets, then one per episode (a gym env is not reset twice).
  assert envs.resets - 2 in (envs.episodes - 2, envs.episodes - 1,
                             envs.episodes), (envs.resets, envs.episodes)
  envs.close()


def test_card_game_actor_writes_no_item_past_an_episode_end(cluster,
                                                            tmp_path):
  """The tutorial's game in two environment subprocesses of a real actor:
  every item of the table lies within one episode (a LAST is only ever
  followed by the next episode's FIRST)."""
  address, flags = _server(cluster, _CARD_GAME, ['--agent=dqn'])
  cluster.start('actor', 'actor', flags + [
      '--agent=dqn', '--initial_collect_steps=600', '--max_train_steps=10',
      '--env_processes=2', f'--root_dir={tmp_path}/a'])
  deadline = time.monotonic() + 240
  while (table_size(address) or 0) < 500:
    assert time.monotonic() < deadline, cluster.tail('actor')
    assert cluster.procs['actor'].poll() is None, cluster.tail('actor')
    time.sleep(0.5)
  client = reverb.Client(address)
  last, first = int(ts.StepType.LAST), int(ts.StepType.FIRST)
  for sample in client.sample(table_names.REPLAY_TABLE, num_samples=300,
                              emit_timesteps=False,
                              unpack_as_table_signature=True):
    step_type = np.asarray(sample.data.step_type).tolist()
    next_step_type = np.asarray(sample.data.next_step_type).tolist()
    reward = np.asarray(sample.data.reward).tolist()
    item = (step_type, next_step_type, reward)
    assert step_type[0] != last, item
    if step_type[1] == last:
      assert next_step_type[1] == first, item
    assert all(-21 <= r <= 0 for r in reward), item


def _push_always_first_action(address, env_name):
  """Weights whose greedy action is always 0, at train_step 1."""
  environment = environments.load_environment(env_name)
  agent = agents.create_agent(environment, config_lib.DqnConfig(batch_size=32))
  variables = agents.shared_variables(agent, agent.train_step_counter)
  weights = tf.nest.flatten(variables['policy_variables'])
  for v in weights:
    v.assign(tf.zeros_like(v))
  weights[-1].assign([1.0] + [0.0] * (weights[-1].shape[0] - 1))
  agent.train_step_counter.assign(1)
  VariableContainerClient(address, variables, 120).push(variables)


@pytest.mark.parametrize('env_name', [_CARD_GAME, 'CartPole-v0'])
def test_evaluation_metrics_agree(cluster, tmp_path, env_name):
  """Episodes, lengths, steps and returns of one evaluation agree (the
  tutorial's game used to give AverageReturn -1081, AverageEpisodeLength 0
  over 101 'episodes')."""
  address, flags = _server(cluster, env_name, ['--agent=dqn'])
  cluster.wait_for_log('replay_server', 'serving tables', 180)
  _push_always_first_action(address, env_name)
  cluster.start('evaluator', 'actor', flags + [
      '--agent=dqn', '--mode=eval', '--train_steps=1',
      '--num_eval_episodes=5', '--video_episodes=0',
      f'--root_dir={tmp_path}/e'])
  assert cluster.wait('evaluator', 240) == 0, cluster.tail('evaluator')
  from actor import evaluate  # pylint: disable=g-import-not-at-top
  rows = evaluate.read_metrics(str(tmp_path / 'e' / 'eval'))
  assert len(rows) == 1, rows
  row = rows[0]
  assert row['num_episodes'] == 5, row
  assert row['AverageEpisodeLength'] > 0, row
  assert row['eval_env_steps'] == pytest.approx(
      row['AverageEpisodeLength'] * 5), row
  assert row['ReturnMin'] <= row['AverageReturn'] <= row['ReturnMax'], row
  if env_name == _CARD_GAME:
    assert row['ReturnMin'] >= -21 and row['ReturnMax'] <= 0, row


def test_evaluator_reads_weights_from_another_shard_when_one_stops():
  """Variables on every shard: the first shard that answers, then the next
  when it stops answering."""
  from actor import evaluate  # pylint: disable=g-import-not-at-top
  sac = config_lib.SacConfig(actor_fc_layers=(8,), critic_joint_fc_layers=(8,),
                             batch_size=4)
  servers = [reverb.Server(tables.build_tables('Pendulum-v1', sac,
                                               replay=None), port=free_port())
             for _ in range(2)]
  addresses = [f'localhost:{s.port}' for s in servers]
  try:
    env = environments.load_environment('Pendulum-v1')
    agent = agents.create_agent(env, sac)
    variables = agents.shared_variables(agent, agent.train_step_counter)
    for step, address in zip((5, 7), addresses):
      agent.train_step_counter.assign(step)
      VariableContainerClient(address, variables, 10).push(variables)
    settings = config_lib.EvalConfig(
        env_name='Pendulum-v1', root_dir='', variable_address=addresses[0],
        max_train_steps=10, agent=sac, server_timeout_s=10,
        replay_shards=tuple(addresses), variables_on_shards=True)
    weights = evaluate.FirstAnswering(addresses, variables, settings,
                                      lambda: False)
    assert weights.latest_train_step() == 5
    servers[0].stop()
    assert weights.latest_train_step() == 7
    assert weights.pull_into(variables) == 7
  finally:
    servers[1].stop()


def test_rollback_check_notices_the_weights_going_back():
  """The one check, for the collector and the evaluator: a train_step older
  than the last one seen (a learner restored an older checkpoint)."""
  from actor import triggers  # pylint: disable=g-import-not-at-top
  check = triggers.RollbackCheck('actor 0')
  assert not check(None, 'acting with them')  # Nothing read: ignored.
  assert not check(40, 'acting with them')
  assert not check(40, 'acting with them')
  assert not check(None, 'acting with them')
  assert check.last_step == 40
  assert check(10, 'acting with them')
  assert check.last_step == 10
  assert not check(20, 'acting with them')


def test_evaluator_status_goes_to_every_server_that_answers():
  """After an evaluation its status is data on the servers the weights come
  from: each that answers and has the status table; one that is gone or has
  no status table is skipped."""
  from actor import triggers  # pylint: disable=g-import-not-at-top
  from variable_container import status  # pylint: disable=g-import-not-at-top
  with_status = [reverb.Server(status.status_tables(), port=free_port())
                 for _ in range(2)]
  without = reverb.Server([tables.actor_id_table()], port=free_port())
  gone = f'localhost:{free_port()}'
  addresses = [f'localhost:{s.port}' for s in with_status + [without]]
  try:
    publish = triggers.StatusPublish(addresses[:1] + [gone] + addresses[1:])
    row = {'AverageReturn': -3.5, 'AverageEpisodeLength': 21.0,
           'num_episodes': 5}
    publish(30, row)
    for address in addresses[:2]:
      got = status.read(reverb.Client(address), status.EVALUATOR, 10)
      assert got is not None, address
      assert (got['train_step'], got['average_return'], got['episodes'],
              got['average_episode_length']) == (30, -3.5, 5, 21.0), got
    publish(40, dict(row, AverageReturn=1.0))
    got = status.read(reverb.Client(addresses[0]), status.EVALUATOR, 10)
    assert (got['train_step'], got['average_return']) == (40, 1.0), got
  finally:
    for server in with_status + [without]:
      server.stop()


class _Weights:
  """The learner's train steps as the evaluator would see them, in turn."""

  def __init__(self, steps):
    self._steps = list(steps)

  def latest_train_step(self):  # The learner moves on between polls.
    self._latest = self._steps[0]
    if len(self._steps) > 1:
      self._steps.pop(0)
    return self._latest

  def pull_into(self, variables):
    del variables
    return self._latest


class _Evaluation:
  def __init__(self, steps):
    self.weights = _Weights(steps)
    self.variables = None
    self.evaluated = []

  def run(self, step):
    self.evaluated.append(step)
    return {'train_step': step}


@pytest.mark.parametrize('recorded,expected', [
    ([], [10, 15, 20]),
    # Resumed from a checkpoint at 10, whose evaluation is recorded: the
    # restored weights are not evaluated (and recorded) a second time.
    ([{'train_step': 5}, {'train_step': 10}], [15, 20]),
])
def test_a_resumed_evaluator_goes_on_after_its_last_evaluation(recorded,
                                                               expected):
  settings = config_lib.EvalConfig(env_name='Pendulum-v1', root_dir='',
                                   eval_interval=5, max_train_steps=20,
                                   poll_interval_s=0)
  from actor import evaluate  # pylint: disable=g-import-not-at-top
  evaluation = _Evaluation([10, 15, 20])
  rows = evaluate.evaluate_at_intervals(
      settings, evaluation, [], lambda: False, recorded)
  assert evaluation.evaluated == expected
  assert [r['train_step'] for r in rows] == expected
