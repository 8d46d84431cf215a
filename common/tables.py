"""The Reverb tables (replay and variables), built from flags alone, and serving them.

The table signatures come from the agent that `common.agents` builds for the
environment and hyperparameters, so the server can start before any learner
exists and never reads another process's files.
"""

import time
from typing import List, Optional

from absl import logging
import numpy as np
import reverb

from common import agents
from common import config as config_lib
from common import environments
from common.errors import UserError


def replay_rate_limiter(replay: config_lib.ReplayConfig, batch_size: int):
  if replay.samples_per_insert is None:
    return reverb.rate_limiters.MinSize(replay.min_size_to_sample)
  spi = replay.samples_per_insert
  # Enough slack for a few whole batches to be in flight either way, or the
  # learner and the actors would wait on each other item by item.
  error_buffer = max(
      replay.min_size_to_sample * spi * replay.samples_per_insert_tolerance,
      4.0 * max(spi, batch_size))
  return reverb.rate_limiters.SampleToInsertRatio(
      samples_per_insert=spi,
      min_size_to_sample=replay.min_size_to_sample,
      error_buffer=error_buffer)


def replay_table(signature, replay: config_lib.ReplayConfig,
                 batch_size: int) -> reverb.Table:
  return reverb.Table(
      name=config_lib.REPLAY_TABLE,
      max_size=replay.replay_capacity,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=replay_rate_limiter(replay, batch_size),
      max_times_sampled=0,
      signature=signature)


def variable_table(signature) -> reverb.Table:
  return reverb.Table(
      name=config_lib.VARIABLE_TABLE,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_size=1,
      max_times_sampled=0,
      signature=signature)


def actor_id_table() -> reverb.Table:
  return reverb.Table.queue(config_lib.ACTOR_ID_TABLE,
                            max_size=config_lib.MAX_ACTOR_IDS)


def fill_actor_ids(address: str) -> None:
  """Queues the indices 0, 1, ... for `--task=auto` actors to take in order."""
  client = reverb.Client(address)
  if client.server_info()[config_lib.ACTOR_ID_TABLE].current_size:
    return  # Restored from a checkpoint: keep the indices not yet taken.
  with client.writer(max_sequence_length=1) as writer:
    for index in range(config_lib.MAX_ACTOR_IDS):
      writer.append(np.int64(index))
      writer.create_item(config_lib.ACTOR_ID_TABLE, num_timesteps=1,
                         priority=1.0)


def claim_actor_id(address: str) -> int:
  """Takes the next free actor index from the replay server's queue."""
  client = reverb.Client(address)
  if config_lib.ACTOR_ID_TABLE not in client.server_info():
    raise UserError(f'--task=auto: the server at {address} has no '
                    f'{config_lib.ACTOR_ID_TABLE!r} table (not started with '
                    'python -m replay_server?); give --task=<index>')
  sample = next(client.sample(config_lib.ACTOR_ID_TABLE, num_samples=1))
  return int(sample[0].data[0])


def build_tables(env_name: str, sac: config_lib.SacConfig,
                 replay: Optional[config_lib.ReplayConfig],
                 with_variables: bool = True) -> List[reverb.Table]:
  """The tables for `env_name`; `replay=None` builds the variables table only."""
  env = environments.load_environment(env_name)
  try:
    agent = agents.create_sac_agent(env, sac, env_name=env_name)
  finally:
    env.close()
  tables = []
  if replay is not None:
    tables.append(replay_table(agents.replay_signature(agent), replay,
                               sac.batch_size))
    tables.append(actor_id_table())
  if with_variables:
    variables = agents.shared_variables(agent, agent.train_step_counter)
    tables.append(variable_table(agents.variable_signature(variables)))
  return tables


def start_server(tables: List[reverb.Table], port: int) -> reverb.Server:
  try:
    return reverb.Server(tables, port=port)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f'cannot serve on port {port} ({reason}); is another '
                    'server using it? pick another --port') from None


def serve(tables: List[reverb.Table], port: int, should_stop,
          report_interval_s: float = 30.0) -> None:
  """Serves `tables` on `port` until `should_stop()`; logs table sizes."""
  server = start_server(tables, port)
  client = reverb.Client(f'localhost:{server.port}')
  if any(t.name == config_lib.ACTOR_ID_TABLE for t in tables):
    fill_actor_ids(f'localhost:{server.port}')
  names = ', '.join(t.name for t in tables)
  logging.info('serving tables [%s] on port %d', names, server.port)
  last_report = time.monotonic()
  try:
    while not should_stop.wait(1.0):
      if time.monotonic() - last_report >= report_interval_s:
        info = client.server_info()
        logging.info('table sizes: %s', ', '.join(
            f'{name}={info[name].current_size}' for name in sorted(info)
            if name != config_lib.ACTOR_ID_TABLE))
        last_report = time.monotonic()
  finally:
    logging.info('stopping server on port %d', server.port)
    server.stop()
