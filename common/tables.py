"""The Reverb tables (replay and variables), built from flags alone, and serving them.

The table signatures come from the agent that `common.agents` builds for the
environment and hyperparameters, so the server can start before any learner
exists and never reads another process's files.
"""

import errno
import socket
import time
from typing import List, Optional

from absl import logging
import numpy as np
import reverb

from common import agents
from common import config as config_lib
from common import environments
from common import outputs
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


def build_tables(env_name: str, agent_config: config_lib.AgentConfig,
                 replay: Optional[config_lib.ReplayConfig],
                 with_variables: bool = True,
                 env_options: environments.EnvOptions = (
                     environments.EnvOptions())) -> List[reverb.Table]:
  """The tables for `env_name`; `replay=None` builds the variables table only."""
  env = environments.load_environment(env_name, options=env_options)
  try:
    agent = agents.create_agent(env, agent_config, env_name=env_name)
  finally:
    env.close()
  tables = []
  if replay is not None:
    tables.append(replay_table(agents.replay_signature(agent), replay,
                               agent_config.batch_size))
    tables.append(actor_id_table())
  if with_variables:
    variables = agents.shared_variables(agent, agent.train_step_counter)
    tables.append(variable_table(agents.variable_signature(variables)))
  return tables


def start_server(tables: List[reverb.Table], port: int,
                 checkpoint_dir: str = '') -> reverb.Server:
  """Starts serving; with `checkpoint_dir`, first restores its latest checkpoint."""
  checkpointer = None
  if checkpoint_dir:
    outputs.ensure_writable_dir(checkpoint_dir, 'checkpoint_dir')
    checkpointer = reverb.checkpointers.DefaultCheckpointer(path=checkpoint_dir)
  if not _port_is_free(port):
    raise UserError(f'port {port} is already in use; stop whatever holds it '
                    'or pick another --port')
  try:
    return reverb.Server(tables, port=port, checkpointer=checkpointer)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if checkpoint_dir:
      raise UserError(f'cannot restore the checkpoint in {checkpoint_dir} '
                      f'({reason}); was it written for another --env or other '
                      'network flags? use an empty --checkpoint_dir') from None
    raise UserError(f'cannot serve on port {port} ({reason})') from None


def _port_is_free(port: int) -> bool:
  """False if something listens on `port` (as gRPC, ignores TIME_WAIT)."""
  for family, host in ((socket.AF_INET6, '::'), (socket.AF_INET, '0.0.0.0')):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind((host, port))
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          return False
  return True


def _sizes(client: reverb.Client) -> str:
  info = client.server_info(timeout=10)
  return ', '.join(f'{name}={info[name].current_size}' for name in sorted(info)
                   if name != config_lib.ACTOR_ID_TABLE)


def serve(tables: List[reverb.Table], port: int, should_stop,
          checkpoint_dir: str = '', checkpoint_interval_s: float = 600.0,
          report_interval_s: float = 30.0) -> None:
  """Serves `tables` on `port` until `should_stop`; checkpoints if asked.

  With `checkpoint_dir`, the tables are restored from its latest checkpoint at
  start, checkpointed every `checkpoint_interval_s` and once more on stop.
  """
  server = start_server(tables, port, checkpoint_dir)
  address = f'localhost:{server.port}'
  client = reverb.Client(address)
  if any(t.name == config_lib.ACTOR_ID_TABLE for t in tables):
    fill_actor_ids(address)
  names = ', '.join(t.name for t in tables)
  logging.info('serving tables [%s] on port %d', names, server.port)
  if checkpoint_dir:
    logging.info('checkpoints in %s every %gs; restored: %s', checkpoint_dir,
                 checkpoint_interval_s, _sizes(client))
  last_report = last_checkpoint = time.monotonic()

  def checkpoint(why):
    # Sizes read first: inserts continue while the checkpoint is written, so
    # it holds at least these items (until the table is full).
    sizes = _sizes(client)
    path = client.checkpoint()
    logging.info('checkpoint (%s) written to %s: %s', why, path, sizes)

  try:
    while not should_stop.wait(1.0):
      now = time.monotonic()
      if checkpoint_dir and now - last_checkpoint >= checkpoint_interval_s:
        checkpoint('periodic')
        last_checkpoint = now
      if now - last_report >= report_interval_s:
        logging.info('table sizes: %s', _sizes(client))
        last_report = now
    if checkpoint_dir:
      checkpoint('on stop')
  finally:
    logging.info('stopping server on port %d', server.port)
    server.stop()
