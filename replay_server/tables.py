"""The replay server's tables, built from settings alone.

The table signatures come from the agent that `common.build` builds for the
environment and hyperparameters, so the server can start before any learner
exists and never reads another process's files. This module owns the replay
table (and its rate limiter), the `--task=auto` actor-index queue and lease
tables, and the set a server serves (`build_tables`).
"""

from typing import List, Optional

import reverb

from common import agents
from common import build
from common import config as config_lib
from variable_container import contract
from common import table_names
from variable_container import one_value
from variable_container import status
from variable_container import tables as variable_tables_lib


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
  """`uniform_table` (its name kept for stock clients, also when prioritized)."""
  sampler = (reverb.selectors.Prioritized(replay.priority_exponent)
             if replay.prioritized else reverb.selectors.Uniform())
  return reverb.Table(
      name=table_names.REPLAY_TABLE,
      max_size=replay.replay_capacity,
      sampler=sampler,
      remover=reverb.selectors.Fifo(),
      rate_limiter=replay_rate_limiter(replay, batch_size),
      max_times_sampled=0,
      signature=signature)


def actor_id_table() -> reverb.Table:
  """The queue of free `--task=auto` actor indices (`actor_indices`)."""
  return reverb.Table.queue(table_names.ACTOR_ID_TABLE,
                            max_size=table_names.MAX_ACTOR_IDS)


def actor_lease_table() -> reverb.Table:
  """Renewals of held actor indices; the server reads each once.

  A FIFO of bounded size: an insert never blocks (the oldest renewal makes
  room), and every item is gone after the server has sampled it.
  """
  return reverb.Table(
      name=table_names.ACTOR_LEASE_TABLE,
      sampler=reverb.selectors.Fifo(),
      remover=reverb.selectors.Fifo(),
      max_size=table_names.MAX_ACTOR_IDS,
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_times_sampled=1)


def build_tables(env_name: str, agent_config: config_lib.AgentConfig,
                 replay: Optional[config_lib.ReplayConfig],
                 with_variables: bool = True,
                 env_options: config_lib.EnvOptions = (
                     config_lib.EnvOptions())) -> List[reverb.Table]:
  """The tables for `env_name`; `replay=None` builds the variables' only."""
  built = build.build(env_name, agent_config, env_options)
  # Always served (even when no contract is published), so that a checkpoint
  # written with a contract restores into the same set of tables.
  tables = [contract.contract_table()]
  if replay is not None:
    tables.append(replay_table(
        agents.replay_signature(built.agent, replay.replay_layout), replay,
        agent_config.batch_size))
    tables.append(actor_id_table())
    tables.append(actor_lease_table())
    if replay.prioritized:
      tables.append(one_value.max_priority_table())
  if with_variables:
    tables.extend(variable_tables_lib.variable_tables(built.variables))
  return tables


# Bookkeeping, not data: the lease table's items are read once each, the
# contract and the status tables are one item each.
_NOT_DATA = ((table_names.ACTOR_LEASE_TABLE, table_names.CONTRACT_TABLE)
             + tuple(status.table_name(role) for role in status.ROLES))


def table_sizes(client: reverb.Client) -> str:
  """The data tables' sizes, `name=size, ...` (for the server's log)."""
  info = client.server_info(timeout=10)
  return ', '.join(f'{name}={info[name].current_size}' for name in sorted(info)
                   if name not in _NOT_DATA)
