"""Faults a review found, each shown with a real Reverb server in this process.

The process-level ones (a replay server that cannot checkpoint, restarts
without a checkpoint, a learner that rolls the weights back) are in
`test_chaos.py`; the launcher's in `test_launcher.py`.
"""

import threading
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.experimental.distributed import reverb_variable_container
from tf_agents.train import learner as tfa_learner
from tf_agents.train.utils import train_utils

from actor import actor_index
from common import agents
from common import compat
from common import table_names
from common import environments
from common import reverb_connection
from common.errors import UserError
from learner import dataset as dataset_lib
from learner import run_record
from launcher.local_cluster import free_port
from replay_server import tables
from tests.test_common import TINY_SAC
from variable_container.client import VariableContainerClient
from variable_container import client as client_lib
from variable_container import one_value


@pytest.fixture(name='pendulum')
def _pendulum():
  return environments.load_environment('Pendulum-v1')


def _variable_server():
  built = tables.build_tables('Pendulum-v1', TINY_SAC, replay=None)
  server = reverb.Server(built, port=free_port())
  return server, f'localhost:{server.port}'


def test_claim_actor_id_gives_up_after_the_timeout():
  """An empty queue (or a server that never hands out indices) is an error."""
  server = reverb.Server([tables.actor_id_table()], port=free_port())
  try:
    start = time.monotonic()
    with pytest.raises(UserError, match='no free actor index .* within 2s'):
      actor_index.claim_actor_id(f'localhost:{server.port}', timeout_s=2)
    assert time.monotonic() - start < 10
  finally:
    server.stop()


def test_non_finite_weights_are_never_pushed(pendulum):
  server, address = _variable_server()
  try:
    agent = agents.create_agent(pendulum, TINY_SAC)
    variables = agents.shared_variables(agent, agent.train_step_counter)
    client = VariableContainerClient(address, variables, timeout_s=10)
    agent.train_step_counter.assign(5)
    client.push(variables)
    kernel = variables['policy_variables'][0]
    kernel.assign(tf.fill(kernel.shape, np.nan))
    agent.train_step_counter.assign(6)
    with pytest.raises(UserError, match='non-finite at train_step 6'):
      client.push(variables)
    # The table still holds the last finite weights.
    other = agents.create_agent(pendulum, TINY_SAC)
    pulled = agents.shared_variables(other, other.train_step_counter)
    assert client.pull_into(pulled) == 5
    assert not client_lib.non_finite(pulled)
    assert client.latest_train_step() == 5
  finally:
    server.stop()


def test_a_bug_fails_at_once_and_an_outage_is_retried(pendulum):
  """Only errors that say the server is away are retried."""
  server, address = _variable_server()
  try:
    agent = agents.create_agent(pendulum, TINY_SAC)
    variables = agents.shared_variables(agent, agent.train_step_counter)
    client = VariableContainerClient(address, variables, timeout_s=120)
    calls = []

    def flaky_then_buggy(error):
      def push(*_):
        calls.append(error)
        raise error
      return push

    # A genuine bug (Reverb's own RuntimeError type, not about the
    # connection): raised at once, not retried for --server_timeout_s.
    client.container.push = flaky_then_buggy(
        RuntimeError('Unable to convert value to the table signature'))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match='table signature'):
      client.push(variables)
    assert time.monotonic() - start < 5 and len(calls) == 1
    # A dropped connection is retried until it works.
    outage = [tf.errors.UnavailableError(None, None, 'Socket closed'),
              RuntimeError('recvmsg: Connection reset by peer')]
    real = reverb_variable_container.ReverbVariableContainer(
        address, table_names=[table_names.VARIABLE_TABLE])

    def push_after_outage(values, table):
      if outage:
        raise outage.pop(0)
      real.push(values, table)

    client.container.push = push_after_outage
    agent.train_step_counter.assign(7)
    client.push(variables)
    assert client.latest_train_step() == 7
  finally:
    server.stop()
  assert reverb_connection.is_transient(
      reverb.errors.DeadlineExceededError('x'))
  assert reverb_connection.is_transient(tf.errors.InternalError(
      None, None, 'Error when confirming that all items written to table'))
  assert not reverb_connection.is_transient(tf.errors.InvalidArgumentError(
      None, None, 'incompatible tensor'))
  assert not reverb_connection.is_transient(ValueError('bad nest'))


def test_a_lost_reverb_client_resource_is_rebuilt_and_the_pull_done(
    pendulum, caplog):
  """The TF resource behind the container's Reverb client gone (an actor and
  a learner in one process, on a loaded CI machine): the pull goes on over a
  new client, logged; any other NotFoundError is raised."""
  server, address = _variable_server()
  try:
    agent = agents.create_agent(pendulum, TINY_SAC)
    variables = agents.shared_variables(agent, agent.train_step_counter)
    client = VariableContainerClient(address, variables, timeout_s=10)
    agent.train_step_counter.assign(9)
    client.push(variables)
    lost = client.container

    def gone(*_):
      raise tf.errors.NotFoundError(
          None, None, 'Resource localhost/_3_ReverbClient/N8deepmind6reverb'
          '12_GLOBAL__N_114ClientResourceE does not exist.')

    lost.update = gone
    other = agents.create_agent(pendulum, TINY_SAC)
    pulled = agents.shared_variables(other, other.train_step_counter)
    with caplog.at_level('WARNING'):
      assert client.pull_into(pulled) == 9
    assert client.container is not lost
    assert 'the Reverb client of this process for' in caplog.text
    client.container.update = lambda *_: (_ for _ in ()).throw(
        tf.errors.NotFoundError(None, None, 'no such table'))
    with pytest.raises(tf.errors.NotFoundError, match='no such table'):
      client.pull_into(pulled)
  finally:
    server.stop()


def test_train_step_is_read_without_pulling_the_weights(pendulum):
  server, address = _variable_server()
  try:
    agent = agents.create_agent(pendulum, TINY_SAC)
    variables = agents.shared_variables(agent, agent.train_step_counter)
    client = VariableContainerClient(address, variables, timeout_s=10)
    assert client.latest_train_step() is None
    # A stock TF-Agents learner pushes the weights only: still readable.
    stock = reverb_variable_container.ReverbVariableContainer(
        address, table_names=[table_names.VARIABLE_TABLE])
    agent.train_step_counter.assign(3)
    stock.push(variables)
    assert client.latest_train_step() == 3
    # Ours also writes the one-integer table, which is what is read.
    agent.train_step_counter.assign(9)
    client.push(variables)
    assert one_value.take_int64s(address, table_names.TRAIN_STEP_TABLE,
                                 1000) == [9]
    assert client.latest_train_step() == 9
  finally:
    server.stop()


def test_the_input_pipeline_keeps_every_sampled_item_across_waits(pendulum):
  """Items arrive in bursts with pauses longer than the sample timeout.

  Each item can be sampled once: every item the rate limiter let out must
  reach training. (A pipeline rebuilt after each timeout dropped the partial
  batches its readers held: here, most of the data.)
  """
  agent = agents.create_agent(pendulum, TINY_SAC)
  table = reverb.Table(
      name=table_names.REPLAY_TABLE, sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(), max_size=1000, max_times_sampled=1,
      rate_limiter=reverb.rate_limiters.MinSize(1),
      signature=agents.replay_signature(agent))
  server = reverb.Server([table], port=free_port())
  address = f'localhost:{server.port}'
  stop = threading.Event()
  batch, bursts = 8, 4
  try:
    dataset = dataset_lib.experience_dataset(
        address, table_names.REPLAY_TABLE, agent.collect_data_spec,
        batch_size=batch, sequence_length=2, parallel_readers=2, prefetch=2,
        rate_limiter_timeout_ms=300, keep_going=lambda: not stop.is_set())
    received = []

    def consume():
      for experience, _ in dataset:
        received.extend(experience.observation.numpy()[:, 0, 0].tolist())

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    client = reverb.Client(address)
    spec = agent.collect_data_spec
    with client.trajectory_writer(num_keep_alive_refs=2) as writer:
      # The last burst is twice as large: batches that straddle the pauses
      # all complete, so every item of the first `bursts` must arrive.
      for burst in range(bursts + 1):
        for i in range(batch * (2 if burst == bursts else 1)):
          for t in range(2):
            step = tf.nest.map_structure(
                lambda s: np.zeros(s.shape, s.dtype.as_numpy_dtype), spec)
            step = step._replace(observation=np.full(
                3, burst * batch + i, np.float32))
            writer.append(step)
          writer.create_item(table_names.REPLAY_TABLE, 1.0,
                             tf.nest.map_structure(lambda c: c[-2:],
                                                   writer.history))
          writer.end_episode()
        if burst < bursts:
          time.sleep(1.0)  # Over three sample timeouts with nothing to sample.
    deadline = time.monotonic() + 30
    while len(received) < (bursts + 1) * batch and time.monotonic() < deadline:
      time.sleep(0.1)
    assert len(received) == len(set(received)), received
    missing = set(range(bursts * batch)) - set(received)
    assert not missing, sorted(missing)
  finally:
    stop.set()
    server.stop()


def _optimizers(agent):
  optimizers = compat.sac_optimizers(agent)
  return [optimizers['actor'], optimizers['critic'], optimizers['alpha']]


def _optimizer_targets(agent):
  nets = compat.sac_networks(agent)
  return [nets['actor'].trainable_variables,
          nets['critic_1'].trainable_variables +
          nets['critic_2'].trainable_variables,
          [compat.sac_log_alpha(agent)]]


def _state(agent):
  """Every variable of the agent and of its optimizers, in a fixed order.

  (Names differ between two agents in one process: Keras numbers layers.)
  """
  variables = list(agent.variables)
  for opt in _optimizers(agent):
    variables += opt.variables()
  return [(v.name, v.numpy()) for v in variables]


def test_learner_checkpoint_restores_target_networks_and_optimizer(
    pendulum, tmp_path):
  """Train, checkpoint, restore into a fresh agent: the same state.

  Through TF-Agents' Learner, as the learner binary does. Adam's moments and
  step counts only exist once a step is applied, so both agents then apply
  the same (zero) gradients: equal results need equal optimizer state.
  """
  def build():
    step = train_utils.create_train_step()
    return agents.create_agent(pendulum, TINY_SAC, step), step

  spec = None
  trained, trained_step = build()
  spec = trained.collect_data_spec
  zeros = tf.nest.map_structure(
      lambda s: tf.zeros([16, 2] + s.shape.as_list(), s.dtype), spec)
  experience = zeros._replace(
      observation=tf.random.normal([16, 2, 3]),
      action=tf.random.uniform([16, 2, 1], -1, 1),
      reward=tf.random.normal([16, 2]), discount=tf.ones([16, 2]))
  for _ in range(5):
    trained.train(experience)
  tfa_learner.Learner(str(tmp_path), trained_step, trained, None)
  saver = run_record.checkpointer(str(tmp_path), trained, trained_step)
  saver.save(trained_step)

  fresh, fresh_step = build()
  assert not np.allclose(
      compat.sac_networks(fresh)['target_critic_1'].variables[0].numpy(),
      compat.sac_networks(trained)['target_critic_1'].variables[0].numpy())
  tfa_learner.Learner(str(tmp_path), fresh_step, fresh, None)
  assert int(fresh_step.numpy()) == int(trained_step.numpy()) == 5
  for agent in (trained, fresh):
    for opt, variables in zip(_optimizers(agent), _optimizer_targets(agent)):
      opt.apply_gradients([(tf.zeros_like(v), v) for v in variables])
  want, got = _state(trained), _state(fresh)
  assert len(want) == len(got)
  assert any('target' in name.lower() for name, _ in want)
  assert sum('Adam' in name for name, _ in want) >= 6
  for (name, value), (_, restored) in zip(want, got):
    np.testing.assert_array_equal(restored, value, err_msg=name)


def test_make_bench_entry_point_loads():
  """`make bench` (python -m bench.run) defines each flag once."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from launcher.local_cluster import REPO_ROOT  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, '-m', 'bench.run', '--helpfull'],
                       cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
  # absl's --helpfull exits 1 after printing every flag.
  assert 'Error' not in out.stderr, out.stderr[-2000:]
  assert '--baseline_train_steps' in out.stdout + out.stderr
