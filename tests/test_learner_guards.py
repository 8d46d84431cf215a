"""The learner's guards: nothing non-finite escapes, a --root_dir holds one
run, a full disk is survived, no replay shard is needed by all, and its
status reaches the servers as data.

Real Reverb servers on localhost; the learner as a separate OS process where
the behaviour is the process's.
"""

import os
import re
import signal
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.train import learner as tfa_learner
from tf_agents.train.utils import train_utils

from actor import collect as collect_lib
from common import agents
from common import config as config_lib
from common import table_names
from common import environments
from learner import priorities as priorities_lib
from learner import run_record
from learner import train as train_lib
from launcher.local_cluster import TINY, free_port, wait_until
from replay_server import server as server_lib
from replay_server import tables
from tests.test_common import TINY_SAC
from variable_container import client as client_lib
from variable_container import one_value
from variable_container import status

# The agent the TINY flags build.
_TINY_FLAGS_SAC = config_lib.SacConfig(actor_fc_layers=(32, 32),
                                       critic_joint_fc_layers=(32, 32),
                                       batch_size=32)


def _flags(address, train_steps, env='Pendulum-v1'):
  return [f'--env={env}', f'--replay_address={address}',
          '--replay_capacity=20000', '--min_size_to_sample=100',
          '--initial_collect_steps=100', f'--train_steps={train_steps}',
          '--push_interval_steps=10', '--pull_interval_steps=10',
          '--policy_save_interval=100000', '--log_interval_s=1'] + TINY


def _saved_steps(log):
  return [int(s) for s in re.findall(r'Saved checkpoint: .*ckpt-(\d+)', log)]


def _train_step(log):
  steps = re.findall(r'learner: train_step (\d+)/', log)
  return int(steps[-1]) if steps else 0


def _checkpoint_files(root_dir):
  directory = run_record.checkpoint_dir(root_dir)
  return sorted({os.path.join(directory, f.split('.')[0])
                 for f in os.listdir(directory) if f.endswith('.index')})


# --- Point 9: non-finite values never escape.


def test_non_finite_weights_are_never_checkpointed_and_a_restart_skips_them(
    cluster, tmp_path):
  """A learner whose first step makes SAC's log alpha inf (its learning
  rate 1e39; alpha is updated last, so that step's losses are finite and
  SAC's own check_numerics sees nothing), with a checkpoint due at every
  step: TF-Agents' Learner checkpointed it inside `run`, before the loss
  and weights were seen, and every restart restored it. Now the learner
  stops in one line with no such checkpoint written, and a restart resumes
  from the last finite one. Then a non-finite checkpoint as an older version
  wrote it is put on disk: the restart skips it, saying which and why.
  """
  port = free_port()
  flags = _flags(f'localhost:{port}', 100000) + [
      '--checkpoint_interval_steps=10']
  root = str(tmp_path / 'learner')
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('actor', 'actor', flags + [f'--root_dir={tmp_path}/a'])
  cluster.start('learner', 'learner', flags + [f'--root_dir={root}'])
  cluster.wait_for_log('learner', r'Saved checkpoint: .*ckpt-[1-9]\d+', 240)
  cluster.signal('learner')
  assert cluster.wait('learner', 60) == 0, cluster.tail('learner')
  last = max(_saved_steps(cluster.log('learner')))

  cluster.start('blown', 'learner', flags + [
      f'--root_dir={root}', '--alpha_learning_rate=1e39',
      '--iterations_per_call=1',
      '--checkpoint_interval_steps=1'])
  code = cluster.wait('blown', 240)
  # No checkpoint on disk holds a NaN or inf.
  for path in _checkpoint_files(root):
    assert not run_record.non_finite_tensors(path), path
  assert code == 2, cluster.tail('blown')
  assert re.search(r'learner: error: (weights|loss) became non-finite at '
                   rf'train_step {last + 1}', cluster.log('blown')), (
                       cluster.tail('blown'))

  # An older version's non-finite checkpoint, newer than the last finite one.
  env = environments.load_environment('Pendulum-v1')
  train_step = train_utils.create_train_step()
  agent = agents.create_agent(env, _TINY_FLAGS_SAC, train_step)
  tfa_learner.Learner(root, train_step, agent, None)
  assert int(train_step.numpy()) == last
  older = run_record.checkpointer(root, agent, train_step)
  kernel = agent.collect_policy.variables()[0]
  kernel.assign(tf.fill(kernel.shape, np.nan))
  train_step.assign(last + 5)
  older.save(train_step)

  cluster.start('learner_again', 'learner', flags + [f'--root_dir={root}'])
  cluster.wait_for_log('learner_again', rf'skipping checkpoint \S*ckpt-'
                       rf'{last + 5} \(\d+ tensors hold NaN or inf', 120)
  resumed = int(cluster.wait_for_log(
      'learner_again', r'resumed from checkpoint at train_step (\d+)',
      60).group(1))
  assert resumed == last
  cluster.wait_for_log('learner_again',
                       rf'pushed initial weights \(train_step {last}\)', 60)


def _prioritized_server(items=8):
  table = reverb.Table(
      table_names.REPLAY_TABLE, reverb.selectors.Prioritized(0.6),
      reverb.selectors.Fifo(), 1000, reverb.rate_limiters.MinSize(1),
      signature=tf.TensorSpec([None, 3], tf.float32))
  server = reverb.Server([table, one_value.max_priority_table()],
                         port=free_port())
  client = reverb.Client(f'localhost:{server.port}')
  with client.trajectory_writer(2) as writer:
    for i in range(items + 1):
      writer.append(np.full([3], i, np.float32))
      if i:
        writer.create_item(table_names.REPLAY_TABLE, 1.0, writer.history[-2:])
  return server, client


def _priorities(client):
  info = client.server_info()[table_names.REPLAY_TABLE]
  samples = client.sample(table_names.REPLAY_TABLE, num_samples=200)
  found = {s[0].info.key: s[0].info.priority for s in samples}
  assert len(found) == info.current_size, (found, info.current_size)
  return found


def test_inf_td_errors_never_reach_a_table_and_every_shard_gets_the_max():
  """+inf and NaN |TD errors| are dropped before Reverb (which takes them);
  the finite ones land; each shard publishes its own finite max priority."""
  (server_a, client_a), (server_b, client_b) = (_prioritized_server(),
                                                _prioritized_server())
  addresses = [f'localhost:{s.port}' for s in (server_a, server_b)]
  updater = priorities_lib.PriorityUpdater(addresses).start()
  try:
    keys = sorted(_priorities(client_a))
    td_errors = np.array([np.inf, np.nan, 3.0] + [0.5] * (len(keys) - 3))
    updater.submit(np.array(keys, np.uint64), td_errors)
    for client in (client_a, client_b):
      wait_until(
          lambda c=client: one_value.read_max_priority(c) is not None, 30,
          lambda: f'max priority at {addresses}')
    priorities = _priorities(client_a)
    assert all(np.isfinite(p) for p in priorities.values()), priorities
    assert priorities[keys[2]] == pytest.approx(3.0, rel=1e-4)
    for client in (client_a, client_b):
      assert one_value.read_max_priority(client) == pytest.approx(
          3.0, rel=1e-4)
    assert updater.non_finite == 2
  finally:
    updater.stop()
    server_a.stop()
    server_b.stop()


# --- Point 3: a rerun on the same --root_dir must not resume another run.


def test_a_rerun_with_other_settings_is_refused_in_one_line(cluster, tmp_path):
  """The settings are recorded before any server is asked; a rerun with
  other network sizes is refused before it waits for one."""
  root = str(tmp_path / 'learner')
  flags = ['--env=Pendulum-v1', f'--replay_address=localhost:{free_port()}',
           f'--root_dir={root}', '--server_timeout_s=60'] + TINY
  cluster.start('first', 'learner', flags)
  path = os.path.join(root, 'train', 'run_settings.json')
  wait_until(lambda: os.path.exists(path), 60,
             lambda: f'{path}:\n{cluster.tail("first")}')
  cluster.signal('first', signal.SIGKILL)
  cluster.start('other', 'learner', flags + ['--actor_fc_layers=64,64'])
  assert cluster.wait('other', 60) == 2, cluster.tail('other')
  error = [line for line in cluster.log('other').splitlines()
           if 'error:' in line]
  assert error == [
      f'learner: error: --root_dir={root} holds the checkpoints of another '
      'run: it ran with --actor_fc_layers=32,32, this one has '
      f'--actor_fc_layers=64,64; give another --root_dir, or delete '
      f'{root}/train to start afresh'], cluster.tail('other')
  assert 'Traceback' not in cluster.log('other')


def test_a_checkpoint_of_other_networks_without_settings_is_one_line(
    cluster, tmp_path):
  """An older version's checkpoint (no run_settings.json) of 32-unit
  networks, resumed with 64-unit ones: one line, not a traceback."""
  root = str(tmp_path / 'learner')
  env = environments.load_environment('Pendulum-v1')
  train_step = train_utils.create_train_step()
  agent = agents.create_agent(env, TINY_SAC, train_step)
  train_step.assign(40)
  tfa_learner.Learner(root, train_step, agent, None)
  run_record.checkpointer(root, agent, train_step).save(train_step)
  wide = config_lib.SacConfig(actor_fc_layers=(64, 64),
                              critic_joint_fc_layers=(64, 64), batch_size=32)
  server = reverb.Server(tables.build_tables(
      'Pendulum-v1', wide, config_lib.ReplayConfig(min_size_to_sample=100)),
                         port=free_port())
  try:
    cluster.start('learner', 'learner', [
        '--env=Pendulum-v1', f'--replay_address=localhost:{server.port}',
        f'--root_dir={root}', '--actor_fc_layers=64,64',
        '--critic_joint_fc_layers=64,64', '--batch_size=32',
        '--server_timeout_s=60'])
    assert cluster.wait('learner', 120) == 2, cluster.tail('learner')
  finally:
    server.stop()
  log = cluster.log('learner')
  assert 'Traceback' not in log, cluster.tail('learner')
  assert re.search(r'learner: error: cannot restore checkpoint \S+ckpt-40 .*'
                   r'give another --root_dir, or delete \S+/train', log), (
                       cluster.tail('learner'))
  assert not os.path.exists(os.path.join(root, 'train', 'run_settings.json'))


def test_an_unreadable_latest_checkpoint_is_skipped(tmp_path):
  """A checkpoint whose data file was cut short (listed by an older version,
  or a disk that lost it) is not restored; the one before is."""
  root = str(tmp_path)
  env = environments.load_environment('Pendulum-v1')
  train_step = train_utils.create_train_step()
  agent = agents.create_agent(env, TINY_SAC, train_step)
  tfa_learner.Learner(root, train_step, agent, None)
  saver = run_record.checkpointer(root, agent, train_step)
  for step in (10, 20):
    train_step.assign(step)
    saver.save(train_step)
  data = [f for f in os.listdir(run_record.checkpoint_dir(root))
          if f.startswith('ckpt-20.data')][0]
  with open(os.path.join(run_record.checkpoint_dir(root), data), 'r+b') as f:
    f.truncate(16)
  chosen = run_record.choose_checkpoint(root)
  assert chosen.endswith('ckpt-10'), chosen
  assert tf.train.latest_checkpoint(
      run_record.checkpoint_dir(root)).endswith('ckpt-10')


# --- Point 10: a disk that is really full.


@pytest.fixture(name='tiny_tmpfs')
def _tiny_tmpfs():
  directory = tempfile.mkdtemp(prefix='full_disk_')
  mounted = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', directory],
      capture_output=True, text=True)
  if mounted.returncode:
    os.rmdir(directory)
    pytest.skip(f'cannot mount a tmpfs here ({mounted.stderr.strip()}): '
                'a really full disk needs it')
  try:
    yield directory
  finally:
    subprocess.run(['umount', '-l', directory], check=False)
    os.rmdir(directory)


def _fill(path):
  """Writes zeros to `path` until the filesystem is full."""
  block = b'\0' * (1 << 16)
  with open(path, 'wb') as f:
    try:
      while True:
        f.write(block)
        f.flush()
    except OSError:
      pass


def test_learner_survives_a_full_disk_and_checkpoints_again(
    cluster, tmp_path, tiny_tmpfs):
  port = free_port()
  flags = _flags(f'localhost:{port}', 1000000) + [
      '--checkpoint_interval_steps=50']
  root = os.path.join(tiny_tmpfs, 'learner')
  cluster.start('replay_server', 'replay_server', flags + [f'--port={port}'])
  cluster.start('actor', 'actor', flags + [f'--root_dir={tmp_path}/a'])
  cluster.start('learner', 'learner', flags + [f'--root_dir={root}'])
  cluster.wait_for_log('learner', r'Saved checkpoint: .*ckpt-\d+', 240)
  filler = os.path.join(tiny_tmpfs, 'filler')
  _fill(filler)
  failed = int(cluster.wait_for_log(
      'learner', r'E\d{4} .*checkpoint at train_step (\d+) failed \(.*\); '
      'training goes on', 120).group(1))
  # Training goes on on the full disk.
  wait_until(lambda: _train_step(cluster.log('learner')) >= failed + 150, 120,
             lambda: cluster.tail('learner'))
  state = tf.train.get_checkpoint_state(run_record.checkpoint_dir(root))
  assert not any(p.endswith(f'ckpt-{failed}')
                 for p in state.all_model_checkpoint_paths)
  os.remove(filler)
  wait_until(lambda: [s for s in _saved_steps(cluster.log('learner'))
                      if s > failed], 120, lambda: cluster.tail('learner'))
  cluster.signal('learner')
  assert cluster.wait('learner', 60) == 0, cluster.tail('learner')
  # Every checkpoint the state lists is whole.
  state = tf.train.get_checkpoint_state(run_record.checkpoint_dir(root))
  for path in state.all_model_checkpoint_paths:
    assert not run_record.non_finite_tensors(path)


# --- Point 8: weights on every shard; a shard that is down holds up nothing.


def _variable_shard(port=0):
  return reverb.Server(tables.build_tables('Pendulum-v1', TINY_SAC,
                                           replay=None),
                       port=port or free_port())


def test_weights_reach_every_shard_and_a_dead_shard_blocks_nothing():
  shards = [_variable_shard(), _variable_shard()]
  ports = [s.port for s in shards]
  addresses = [f'localhost:{p}' for p in ports]
  env = environments.load_environment('Pendulum-v1')
  agent = agents.create_agent(env, TINY_SAC)
  variables = agents.shared_variables(agent, agent.train_step_counter)
  pusher = client_lib.ShardedVariablePusher(addresses, variables, 30)

  def step_at(address):
    try:
      return one_value.published_train_step(reverb.Client(address),
                                            timeout_s=1.0)
    except Exception:  # pylint: disable=broad-except
      return None

  try:
    agent.train_step_counter.assign(1)
    pusher.push(variables)
    pusher.flush(20)
    assert [step_at(a) for a in addresses] == [1, 1]
    assert pusher.latest_train_step() == 1

    shards[0].stop()  # Shard 0 dies.
    for step in (2, 3):
      agent.train_step_counter.assign(step)
      start = time.monotonic()
      pusher.push(variables)
      assert time.monotonic() - start < 1.0  # Never waits on a shard.
    wait_until(lambda: step_at(addresses[1]) == 3, 30,
               lambda: f'shard 1 at {step_at(addresses[1])}')
    assert pusher.latest_train_step() == 3

    shards[0] = _variable_shard(ports[0])  # Back, empty, on its port.
    # gRPC's reconnect backoff may hold the first reconnect a while.
    wait_until(lambda: step_at(addresses[0]) == 3, 120,
               lambda: f'shard 0 at {step_at(addresses[0])}')
    # And the weights themselves, not just the step.
    other = agents.create_agent(env, TINY_SAC)
    pulled = agents.shared_variables(other, other.train_step_counter)
    reader = client_lib.VariableContainerClient(addresses[0], pulled, 10)
    assert reader.pull_into(pulled) == 3
    np.testing.assert_array_equal(
        pulled['policy_variables'][0].numpy(),
        variables['policy_variables'][0].numpy())
  finally:
    pusher.stop()
    for shard in shards:
      shard.stop()


# --- Status as data: what the launcher and the benchmarks read.


def test_the_learner_publishes_its_status_to_the_servers(tmp_path):
  """train_step, train_steps, steps/s and finished reach the server's status
  table as data: no log text involved."""
  config = config_lib.DqnConfig(q_fc_layers=(16,), batch_size=8)
  replay = config_lib.ReplayConfig(replay_capacity=2000, min_size_to_sample=50,
                                   samples_per_insert=None)
  server = server_lib.start_server(
      tables.build_tables('CartPole-v0', config, replay), free_port())
  address = f'localhost:{server.port}'
  stop = threading.Event()
  try:
    actor = threading.Thread(target=collect_lib.collect, args=(
        config_lib.CollectConfig(
            env_name='CartPole-v0', root_dir=str(tmp_path / 'actor'),
            replay_address=address, variable_address=address,
            max_train_steps=60, initial_collect_steps=50,
            pull_interval_steps=10, agent=config, server_timeout_s=30),
        stop.is_set), daemon=True)
    actor.start()
    result = train_lib.train(
        config_lib.LearnerConfig(
            env_name='CartPole-v0', root_dir=str(tmp_path / 'learner'),
            replay_address=address, variable_address=address,
            train_steps=60, agent=config, push_interval_steps=10,
            policy_save_interval=100000, server_timeout_s=30,
            log_interval_s=0.1),
        tf.distribute.get_strategy())
    learner = status.read(reverb.Client(address), status.LEARNER)
    assert learner is not None
    assert learner['finished'] is True
    assert learner['train_step'] == result.train_step == 60
    assert learner['train_steps'] == 60
    assert learner['steps_per_s'] == pytest.approx(result.steps_per_second)
    actor.join(60)
  finally:
    stop.set()
    server.stop()
