"""The learner's input pipeline: batches sampled from the replay table.

Reverb's `TrajectoryDataset` read by a few parallel readers, each batching
whole items, then repacked into the agent's `collect_data_spec`. On this
project's 2-core machine it serves about 3.7 times the batches/s of
`ReverbReplayBuffer.as_dataset` (whose per-item interleave and map dominate),
measured by `bench/run.py` (see BENCHMARKS.md).

A table of the packed layout (`--replay_layout=packed`: each item one float32
tensor, `common.agents.packed_width`) is unpacked here into the same
`collect_data_spec` batches; the rest of the learner sees no difference.
"""

import functools
import time
from typing import Callable, Mapping, Optional, Sequence, Union

import reverb
import tensorflow as tf

from common import agents


def _signature(addresses: Sequence[str], table: str):
  """The table's signature, from the first shard that answers.

  Every shard serves the same one (each one's is checked by the learner
  before it builds this). With shards, one that is down (the pipeline is
  rebuilt while it is) must not stop the others being sampled.
  """
  if len(addresses) == 1:
    return reverb.Client(addresses[0]).server_info()[table].signature
  error = None
  for _ in range(3):
    for server in addresses:
      try:
        return reverb.Client(server).server_info(timeout=3)[table].signature
      except Exception as e:  # pylint: disable=broad-except
        error = e
    time.sleep(1.0)
  raise error


def _stream(server, table: str, shapes, dtypes, batch_size: int,
            rate_limiter_timeout_ms: int,
            reverb_options: Optional[Mapping] = None) -> tf.data.Dataset:
  """One Reverb stream of items from `server`."""
  options = dict(
      max_in_flight_samples_per_worker=2 * batch_size,
      # A stream per batch: the server and this client pay less per item
      # (about 1.8x the batches/s of unbounded streams, BENCHMARKS.md),
      # and with shards the streams spread evenly over them.
      max_samples_per_stream=batch_size)
  options.update(reverb_options or {})
  return reverb.TrajectoryDataset(
      server_address=server, table=table, shapes=shapes, dtypes=dtypes,
      rate_limiter_timeout_ms=rate_limiter_timeout_ms, **options)


def _go_on(_, keep_going: Callable[[], bool]):
  flag = tf.py_function(lambda: bool(keep_going()), [], tf.bool)
  return tf.reshape(flag, [])


def _reader(server, stream: Callable, batch_size: int,
            keep_going: Optional[Callable[[], bool]]) -> tf.data.Dataset:
  """One reader: whole batches of `server`'s items."""
  if keep_going is None:
    items = stream(server)
  else:
    # One stream after another, while keep_going(): a stream ends only
    # when it waited rate_limiter_timeout_ms for nothing.
    items = tf.data.Dataset.from_tensors(server).repeat().take_while(
        functools.partial(_go_on, keep_going=keep_going)).flat_map(stream)
  return items.batch(batch_size, drop_remainder=True)


def _unpack(packed: tf.Tensor, data_spec, batch_size: int,
            sequence_length: int):
  """The fields of `data_spec`, flattened, from packed items [batch, steps,
  packed_width(data_spec)] (the packing `common.agents.packed_width` says)."""
  outer = [batch_size, sequence_length]
  packed = tf.ensure_shape(
      packed, outer + [agents.packed_width(data_spec)])
  tensors, start = [], 0
  for spec in tf.nest.flatten(data_spec):
    size = spec.shape.num_elements()
    words = 2 * size if spec.dtype.size == 8 else size
    field = packed[:, :, start:start + words]
    start += words
    if spec.dtype == tf.float32:
      pass
    elif spec.dtype.size == 4:
      field = tf.bitcast(field, spec.dtype)
    elif spec.dtype.size == 8:
      field = tf.bitcast(tf.reshape(field, outer + [size, 2]), spec.dtype)
    else:
      field = tf.cast(field, spec.dtype)
    tensors.append(tf.reshape(field, outer + list(spec.shape)))
  return tensors


def _repack(sample, data_spec, batch_size: int, sequence_length: int,
            alive_bonus: float, packed: bool):
  """`(experience, sample_info)` of one batch, `experience` in `data_spec`."""
  if packed:
    tensors = _unpack(sample.data, data_spec, batch_size, sequence_length)
  else:
    # The table's signature has the spec's layout but neither its Python
    # types (Trajectory, TimeStep) nor a fixed time dimension; restore both.
    tensors = [
        tf.ensure_shape(t, [batch_size, sequence_length] + list(spec.shape))
        for t, spec in zip(tf.nest.flatten(sample.data),
                           tf.nest.flatten(data_spec))]
  experience = tf.nest.pack_sequence_as(data_spec, tensors)
  if alive_bonus:
    alive = tf.cast(experience.discount > 0, experience.reward.dtype)
    experience = experience._replace(
        reward=experience.reward + alive_bonus * alive)
  return experience, sample.info


def experience_dataset(address: Union[str, Sequence[str]], table: str,
                       data_spec, batch_size: int,
                       sequence_length: int, parallel_readers: int = 2,
                       prefetch: int = 8,
                       rate_limiter_timeout_ms: int = -1,
                       alive_bonus: float = 0.0,
                       keep_going: Optional[Callable[[], bool]] = None,
                       reverb_options: Optional[Mapping] = None
                       ) -> tf.data.Dataset:
  """Yields `(experience, sample_info)` batches as TF-Agents' Learner expects.

  Each element holds `batch_size` items of `data_spec` with their time
  dimension. `address` is one server or a sequence of replay shards: each
  shard gets `parallel_readers` readers of its own, and their batches are
  interleaved as they come (a slow or starved shard does not hold up the
  others), so the learner trains on every shard's items.
  With `rate_limiter_timeout_ms >= 0` and no `keep_going`, the
  dataset ends when no item could be sampled for that long. With
  `keep_going`, a reader that waited that long asks `keep_going()` and, if
  True, samples on: the pipeline, its prefetched batches and its partial
  ones survive any wait (every item the rate limiter counted is trained on),
  and ends only once `keep_going()` is False.
  `alive_bonus` is added to the reward of every transition whose discount is
  above 0 (the episode goes on, or was cut by a time limit), not to those
  that end it; the table keeps the environment's own rewards.
  The table may be of either layout (`--replay_layout`); a packed one whose
  items are not `data_spec`'s is a ValueError. `reverb_options`: settings of
  Reverb's `TrajectoryDataset` in place of this pipeline's (benchmarks).
  """
  addresses = [address] if isinstance(address, str) else list(address)
  signature = _signature(addresses, table)
  if agents.is_packed(signature):
    width = agents.packed_width(data_spec)
    if signature.shape.as_list() != [sequence_length, width]:
      raise ValueError(
          f'table {table!r} holds packed items of shape '
          f'{signature.shape.as_list()}, but {sequence_length}-step items of '
          f'this agent pack to [{sequence_length}, {width}]: --env, --agent '
          "and --n_step must match the server's")
  stream = functools.partial(
      _stream, table=table,
      shapes=tf.nest.map_structure(lambda x: x.shape, signature),
      dtypes=tf.nest.map_structure(lambda x: x.dtype, signature),
      batch_size=batch_size, rate_limiter_timeout_ms=rate_limiter_timeout_ms,
      reverb_options=reverb_options)
  reader = functools.partial(_reader, stream=stream, batch_size=batch_size,
                             keep_going=keep_going)
  repack = functools.partial(_repack, data_spec=data_spec,
                             batch_size=batch_size,
                             sequence_length=sequence_length,
                             alive_bonus=alive_bonus,
                             packed=agents.is_packed(signature))
  servers = [a for a in addresses for _ in range(parallel_readers)]
  dataset = tf.data.Dataset.from_tensor_slices(servers).interleave(
      reader, cycle_length=len(servers),
      num_parallel_calls=len(servers), deterministic=False)
  return dataset.map(repack).prefetch(prefetch)
