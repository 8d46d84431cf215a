"""The Reverb tables (replay and variables), built from flags alone, and serving them.

The table signatures come from the agent that `common.agents` builds for the
environment and hyperparameters, so the server can start before any learner
exists and never reads another process's files.
"""

import time
from typing import List, Optional

from absl import logging
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
  names = ', '.join(t.name for t in tables)
  logging.info('serving tables [%s] on port %d', names, server.port)
  last_report = time.monotonic()
  try:
    while not should_stop.wait(1.0):
      if time.monotonic() - last_report >= report_interval_s:
        info = client.server_info()
        logging.info('table sizes: %s', ', '.join(
            f'{name}={info[name].current_size}' for name in sorted(info)))
        last_report = time.monotonic()
  finally:
    logging.info('stopping server on port %d', server.port)
    server.stop()
