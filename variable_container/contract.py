"""The run contract: the flags every process of one run must share.

The replay server publishes its run contract (the settings declared with
`contract=True` in common/config.py)
in a one-item table of its own; every client compares its own with it at
connect. Table signatures only catch dtypes and shapes: processes with
another `--gamma`, `--action_repeat` or `--replay` would connect and train on
each other's data without this.

The contract is one JSON document in a one-value table
(`variable_container.one_value`) that stock TF-Agents clients never look at.
"""

import json
from typing import Mapping, Optional, Tuple

from absl import logging
import reverb

from common import table_names
from common.errors import UserError
from variable_container import one_value


def contract_table() -> reverb.Table:
  """One item, the latest contract (an insert replaces the one before)."""
  return one_value.json_table(table_names.CONTRACT_TABLE)


def _normalized(contract: Mapping) -> dict:
  """As it reads back from the table (tuples become lists, keys strings)."""
  return json.loads(json.dumps(dict(contract), sort_keys=True))


def publish(client: reverb.Client, contract: Mapping) -> None:
  one_value.insert_json(client, table_names.CONTRACT_TABLE, contract)


def read(client: reverb.Client, timeout_s: float = 5.0,
         server_info=None) -> Optional[dict]:
  """The published contract; None if the server has no contract table, or
  none was published within `timeout_s`."""
  if server_info is None:
    server_info = client.server_info(timeout=10)
  if table_names.CONTRACT_TABLE not in server_info:
    return None
  # Sampled even when the table looked empty: a server publishes right after
  # it starts (after its restore check), so a client may ask in between.
  return one_value.read_json(client, table_names.CONTRACT_TABLE, timeout_s)


def first_difference(mine: Mapping,
                     theirs: Mapping) -> Optional[Tuple[str, object, object]]:
  """(flag, mine, theirs) of the first flag both name with other values.

  Flags only one side names (a contract of an older version) are not
  compared.
  """
  mine, theirs = _normalized(mine), _normalized(theirs)
  # The environment and the agent first: the other flags follow from them
  # (presets), so they name the cause.
  first = [f for f in ('env', 'agent') if f in mine]
  for flag in first + sorted(set(mine) - set(first)):
    if flag in theirs and mine[flag] != theirs[flag]:
      return flag, mine[flag], theirs[flag]
  return None


def flag_value(value) -> str:
  """A value as it is written on a command line (`--flag=<this>`)."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if value is None:
    return "''"
  return str(value)


def check(address: str, contract: Optional[Mapping], who: str,
          server_info=None) -> None:
  """UserError unless the server at `address` runs this `contract`.

  Returns quietly when `contract` is None (do not check) or the server has
  no contract table (a stock or older server).
  """
  if contract is None:
    return
  client = reverb.Client(address)
  if server_info is None:
    server_info = client.server_info(timeout=10)
  if table_names.CONTRACT_TABLE not in server_info:
    return
  published = read(client, server_info=server_info)
  if published is None:
    logging.warning('%s: the server at %s published no run contract within '
                    '5s; its flags are not checked against ours', who,
                    address)
    return
  difference = first_difference(contract, published)
  if difference is None:
    return
  flag, mine, theirs = difference
  raise UserError(
      f'--{flag}={flag_value(mine)} here, but the replay server at {address} '
      f'runs --{flag}={flag_value(theirs)}: every process of a run needs the '
      f'same --{flag} (give them one --flagfile)')
