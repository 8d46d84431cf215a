"""The Reverb table names and protocol constants every process agrees on.

Names shared with stock TF-Agents clients (`uniform_table`, `variables`) must
stay as they are: users mix this project's binaries with their own TF-Agents
code.
"""

# Table names shared with stock TF-Agents clients.
REPLAY_TABLE = 'uniform_table'
VARIABLE_TABLE = 'variables'  # reverb_variable_container.DEFAULT_TABLE
# A queue of free actor indices; `--task=auto` actors take the next one.
ACTOR_ID_TABLE = 'actor_ids'
MAX_ACTOR_IDS = 4096
# Live actors renew their index here every ACTOR_LEASE_INTERVAL_S seconds; a
# replay server that starts without a checkpoint waits a grace period for
# these renewals before it hands out indices, so none is handed out twice.
ACTOR_LEASE_TABLE = 'actor_leases'
ACTOR_LEASE_INTERVAL_S = 2.0
# The learner's train_step as one int64 item, written with every weight push,
# so actors and the evaluator read the weight version without pulling the
# weights.
TRAIN_STEP_TABLE = 'train_step'
# Items are written with stride 1; their length is the agent's
# `train_sequence_length` (SAC: 2, (s, a, r, s'); N-step DQN: N+1).
STRIDE_LENGTH = 1
# With --replay=prioritized: the largest priority the learner has written,
# one float64 item, read by actors so new items enter at the max priority.
MAX_PRIORITY_TABLE = 'max_priority'
# The run contract (`variable_container.contract`): the flags every process of a run
# shares, one JSON item the replay server publishes at start.
CONTRACT_TABLE = 'run_contract'

# `--task=auto` actor indices (server side `replay_server.actor_indices`,
# client side `actor.actor_index`).
# Free indices in a server's queue at a time: enough for a few actors that
# start together, few enough that one freed below them is soon at the front.
QUEUE_DEPTH = 8


def shard_of(index: int, num_shards: int) -> int:
  """The shard that hands out actor `index`, holds its lease and gets its
  data: with S replay shards, shard k owns the indices i with i mod S == k."""
  return index % num_shards
