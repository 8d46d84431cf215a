"""The tables a variables server holds: the weights, the train_step of their
latest push and each role's status (`python -m variable_container`, or every
replay server that also serves the variables)."""

from typing import List

import reverb

from common import agents
from common import table_names
from variable_container import one_value
from variable_container import status


def variable_table(signature) -> reverb.Table:
  """`variables` (the name stock TF-Agents clients use): the latest push."""
  return reverb.Table(
      name=table_names.VARIABLE_TABLE,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=reverb.rate_limiters.MinSize(1),
      max_size=1,
      max_times_sampled=0,
      signature=signature)


def variable_tables(variables) -> List[reverb.Table]:
  """The weights' table for the nest `variables`, their train_step and the
  roles' status."""
  return ([variable_table(agents.variable_signature(variables)),
           one_value.train_step_table()] + status.status_tables())
