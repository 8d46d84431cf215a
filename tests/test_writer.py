"""The actor's trajectory writer under a rate limiter that holds inserts back.

A real Reverb server and the real observer; the trajectories are made by hand
so that each step says which episode it belongs to.
"""

import threading
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.trajectories import trajectory

from actor.writer import StoppableTrajectoryObserver
from common import agents
from common import table_names
from common import environments
from launcher.local_cluster import free_port
from learner import dataset as dataset_lib
from tests.test_common import TINY_SAC


def _episode(episode: int, length: int):
  """`length` trajectories; observation = (episode, step, 0)."""
  act = np.zeros(1, np.float32)
  obs = lambda t: np.array([episode, t, 0], np.float32)
  steps = [trajectory.first(obs(0), act, (), np.float32(0), np.float32(1))]
  steps += [trajectory.mid(obs(t), act, (), np.float32(0), np.float32(1))
            for t in range(1, length - 1)]
  steps[-1] = steps[-1]._replace(next_step_type=np.int32(2))  # LAST next.
  steps.append(trajectory.boundary(obs(length - 1), act, (), np.float32(0),
                                   np.float32(1)))
  return steps


def test_no_item_spans_two_episodes_when_end_episode_times_out():
  env = environments.load_environment('Pendulum-v1')
  agent = agents.create_agent(env, TINY_SAC)
  # One sample per insert, tiny slack: every insert waits for the sampler,
  # so the writer's end_episode runs out of time again and again.
  table = reverb.Table(
      name=table_names.REPLAY_TABLE, sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(), max_size=1000, max_times_sampled=1,
      rate_limiter=reverb.rate_limiters.SampleToInsertRatio(
          samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1.5),
      signature=agents.replay_signature(agent))
  server = reverb.Server([table], port=free_port())
  address = f'localhost:{server.port}'
  sampled, done = [], threading.Event()

  def sample_slowly():
    client = reverb.Client(address)
    while not done.is_set():
      for item in client.sample(table_names.REPLAY_TABLE, num_samples=1,
                                emit_timesteps=False,
                                unpack_as_table_signature=True):
        sampled.append(np.asarray(item.data.observation)[:, :2])
      time.sleep(0.02)

  thread = threading.Thread(target=sample_slowly, daemon=True)
  thread.start()
  try:
    observer = StoppableTrajectoryObserver(reverb.Client(address),
                                           lambda: False,
                                           max_in_flight_items=16)
    episodes, length = 12, 4
    history = []
    for episode in range(episodes):
      for step in _episode(episode, length):
        observer(step)
      # The episode ended for Reverb too: the writer's history starts anew
      # (with Reverb's end_episode timing out and not retried, it kept every
      # step of the run and one episode ID for all of them).
      history.append(len(observer.history.observation))
    assert max(history) == 0, history
    expected = episodes * (length - 1)  # 2-step items, stride 1.
    deadline = time.monotonic() + 60
    while len(sampled) < expected and time.monotonic() < deadline:
      time.sleep(0.1)
    assert len(sampled) == expected, (len(sampled), expected)
    spans = [o.tolist() for o in sampled if o[0, 0] != o[1, 0]]
    assert not spans, spans
    # And each item is two consecutive steps of its episode.
    assert all(o[1, 1] == o[0, 1] + 1 for o in sampled), sampled
  finally:
    done.set()
    server.stop()


# Every kind of field the packed layout carries: 4-byte (bit for bit), 8-byte
# (two words each, bit for bit) and narrower (converted) dtypes.
_MIXED_SPEC = trajectory.Trajectory(
    step_type=tf.TensorSpec((), tf.int32),
    observation={'pixels': tf.TensorSpec((2, 3), tf.uint8),
                 'state': tf.TensorSpec((2,), tf.float64),
                 'index': tf.TensorSpec((2,), tf.float32)},
    action=tf.TensorSpec((), tf.int64), policy_info=(),
    next_step_type=tf.TensorSpec((), tf.int32),
    reward=tf.TensorSpec((), tf.float32),
    discount=tf.TensorSpec((), tf.float32))


def _mixed_episode(episode: int, length: int, rng):
  steps = []
  for t in range(length):
    step_type = 0 if t == 0 else (2 if t == length - 1 else 1)
    steps.append(trajectory.Trajectory(
        np.int32(step_type),
        {'pixels': rng.integers(0, 256, (2, 3)).astype(np.uint8),
         'state': rng.standard_normal(2),
         'index': np.array([episode, t], np.float32)},
        np.int64(2**40 + 7 * t), (),
        np.int32(2 if t >= length - 2 else 1),
        np.float32(rng.standard_normal()), np.float32(t < length - 2)))
  return steps


def test_packed_items_reach_the_learner_as_the_stock_ones():
  """The same episodes written to a stock and a packed table (each writer
  follows its table's signature) come out of the learner's pipeline alike,
  bit for bit and with their dtypes."""
  length = 2
  stock_signature = tf.nest.map_structure(
      lambda s: tf.TensorSpec((length,) + tuple(s.shape), s.dtype),
      _MIXED_SPEC)
  packed_signature = tf.TensorSpec(
      (length, agents.packed_width(_MIXED_SPEC)), tf.float32,
      name=agents.PACKED_ITEM)
  assert packed_signature.shape[1] == 1 + 6 + 4 + 2 + 2 + 1 + 1 + 1
  server = reverb.Server([
      reverb.Table.queue('stock', 1000, signature=stock_signature),
      reverb.Table.queue('packed', 1000, signature=packed_signature)],
                         port=free_port())
  address = f'localhost:{server.port}'
  client = reverb.Client(address)
  try:
    writers = {name: StoppableTrajectoryObserver(client, lambda: False,
                                                 length, table=name)
               for name in ('stock', 'packed')}
    assert {n: w.layout for n, w in writers.items()} == {
        'stock': 'stock', 'packed': 'packed'}
    rng = np.random.default_rng(0)
    items = 0
    for episode, steps in enumerate((3, 5, 2, 4)):
      for step in _mixed_episode(episode, steps, rng):
        for writer in writers.values():
          writer(step)
      items += steps - 1
    for writer in writers.values():
      writer.close()
    read = {}
    for name in writers:
      dataset = dataset_lib.experience_dataset(
          address, name, _MIXED_SPEC, batch_size=items, sequence_length=2,
          parallel_readers=1)
      experience, _ = next(iter(dataset))
      # In the order written (queues, but readers may interleave).
      order = np.lexsort(experience.observation['index'][:, 0].numpy().T[::-1])
      read[name] = tf.nest.map_structure(lambda x: x.numpy()[order],
                                         experience)
    tf.nest.assert_same_structure(read['stock'], read['packed'])
    for mine, theirs in zip(tf.nest.flatten(read['packed']),
                            tf.nest.flatten(read['stock'])):
      assert mine.dtype == theirs.dtype
      np.testing.assert_array_equal(mine, theirs)
    assert read['packed'].action.max() > 2**40  # int64 kept exactly.
    # A pipeline for other items refuses the packed table in one line.
    other = _MIXED_SPEC._replace(reward=tf.TensorSpec((2,), tf.float32))
    with pytest.raises(ValueError, match=r'packed items of shape \[2, 18\]'):
      dataset_lib.experience_dataset(address, 'packed', other, 4, 2)
  finally:
    server.stop()


def test_close_sends_the_items_of_unfinished_chunks_and_never_hangs():
  """Stock items wait in chunks of STOCK_CHUNK_LENGTH steps; close() sends
  what an episode cut short left there, and with should_stop() set and a
  rate limiter that takes nothing more, drops it and returns."""
  import actor.writer as writer_lib  # pylint: disable=g-import-not-at-top
  steps = writer_lib.STOCK_CHUNK_LENGTH // 2  # Mid-episode, mid-chunk.
  signature = tf.nest.map_structure(
      lambda s: tf.TensorSpec((2,) + tuple(s.shape), s.dtype), _MIXED_SPEC)
  server = reverb.Server([
      reverb.Table.queue('open', 1000, signature=signature),
      # Takes 2 items, then holds every insert until something samples.
      reverb.Table('held', reverb.selectors.Fifo(), reverb.selectors.Fifo(),
                   max_size=1000, signature=signature,
                   rate_limiter=reverb.rate_limiters.SampleToInsertRatio(
                       samples_per_insert=1.0, min_size_to_sample=1,
                       error_buffer=1.0))], port=free_port())
  client = reverb.Client(f'localhost:{server.port}')
  try:
    rng = np.random.default_rng(0)
    episode = _mixed_episode(0, 4 * steps, rng)[:steps]  # No LAST.
    open_writer = StoppableTrajectoryObserver(client, lambda: False, 2,
                                              table='open')
    for step in episode:
      open_writer(step)
    assert client.server_info()['open'].current_size == 0  # Still chunked.
    open_writer.close()
    assert client.server_info()['open'].current_size == steps - 1
    stop = threading.Event()
    held_writer = StoppableTrajectoryObserver(client, stop.is_set, 2,
                                              table='held')
    for step in episode:
      held_writer(step)
    stop.set()
    started = time.monotonic()
    held_writer.close()
    assert time.monotonic() - started < 10
    assert client.server_info()['held'].current_size < steps - 1
  finally:
    server.stop()
