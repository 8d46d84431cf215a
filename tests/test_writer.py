"""The actor's trajectory writer under a rate limiter that holds inserts back.

A real Reverb server and the real observer; the trajectories are made by hand
so that each step says which episode it belongs to.
"""

import threading
import time

import numpy as np
import reverb
from tf_agents.trajectories import trajectory

from actor.writer import StoppableTrajectoryObserver
from common import agents
from common import table_names
from common import environments
from launcher.local_cluster import free_port
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
