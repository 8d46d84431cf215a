"""The tutorial's replay setup, shared by both tutorial loops (no flags here:
`bench.run` and `bench.tutorial_loop` each define their own)."""


def tutorial_replay(agent, capacity: int, batch_size: int):
  """The tutorial's replay: local server, dataset and trajectory observer."""
  # pylint: disable=g-import-not-at-top
  import reverb
  from tf_agents.replay_buffers import reverb_replay_buffer
  from tf_agents.replay_buffers import reverb_utils
  from common import table_names  # pylint: disable=g-import-not-at-top
  # pylint: enable=g-import-not-at-top
  table = reverb.Table(
      table_names.REPLAY_TABLE,
      max_size=capacity,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=reverb.rate_limiters.MinSize(1))
  server = reverb.Server([table])
  replay = reverb_replay_buffer.ReverbReplayBuffer(
      agent.collect_data_spec, sequence_length=2,
      table_name=table_names.REPLAY_TABLE, local_server=server)
  dataset = replay.as_dataset(sample_batch_size=batch_size,
                              num_steps=2).prefetch(50)
  observer = reverb_utils.ReverbAddTrajectoryObserver(
      replay.py_client, table_names.REPLAY_TABLE, sequence_length=2,
      stride_length=1)
  return server, dataset, observer
