"""Picks the `tf.distribute` strategy the learner trains under.

`multi_worker`: N learner processes, on one machine or many, train one model
synchronously under `tf.distribute.MultiWorkerMirroredStrategy` (ring
all-reduce on CPUs, NCCL on GPUs). The cluster comes from
`--learner_workers=host:port,... --learner_index=i` (written to `TF_CONFIG`,
as TensorFlow reads it) or from a `TF_CONFIG` of the user's. Worker 0 is the
chief. A worker without a heartbeat for `--worker_timeout_s` counts as gone
(TensorFlow's coordination service): the collectives waiting for it fail, so
a worker that dies or hangs ends its peers with one line instead of stopping
them forever. (Not a per-op `CommunicationOptions(timeout_seconds=...)`:
TensorFlow 2.15 starts a thread for every collective op with a timeout,
which sleeps out the whole timeout; at ~7 all-reduces per SAC step that is
thousands of threads, and the process dies of them within minutes.)
"""

import json
import os
from typing import Optional, Sequence, Tuple

from absl import logging
import tensorflow as tf
from tf_agents.train.utils import strategy_utils

from common import compat
from common import config as config_lib
from common import process
from common.errors import UserError
from common.errors import one_line
from common.errors import op_error_reason

def split_cpu(num_devices: int) -> None:
  """Splits the physical CPU into `num_devices` logical devices.

  Must run before TensorFlow initializes its devices (before any op).
  """
  if num_devices <= 1:
    return
  cpus = tf.config.list_physical_devices('CPU')
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)


def _from_tf_config(text: str) -> Tuple[Tuple[str, ...], int]:
  """(workers, index) from a TF_CONFIG; one line for what is wrong."""
  try:
    spec = json.loads(text)
    cluster, task = spec['cluster'], spec['task']
    jobs = set(cluster)
    if jobs != {'worker'}:
      raise UserError(f'TF_CONFIG has jobs {sorted(jobs)}; the learner '
                      'runs only "worker" jobs (worker 0 is the chief)')
    if task.get('type') != 'worker':
      raise UserError(f'TF_CONFIG task type {task.get("type")!r} is not '
                      '"worker"')
    workers = config_lib.parse_addresses(','.join(cluster['worker']),
                                         'TF_CONFIG cluster.worker')
    index = task['index']
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f'TF_CONFIG is not a cluster spec ({one_line(e)}): '
                    'expected {"cluster": {"worker": ["host:port", ...]}, '
                    '"task": {"type": "worker", "index": i}}') from None
  if not isinstance(index, int):
    raise UserError(f'TF_CONFIG task index {index!r} is not a number')
  return workers, index


def worker_cluster(workers, index: int, tf_config: Optional[str]
                   ) -> Tuple[Tuple[str, ...], int]:
  """(every worker's host:port, this worker's index), checked.

  From `--learner_workers`/`--learner_index`, else from `TF_CONFIG`; where
  both are given they must agree.
  """
  if isinstance(workers, int):
    raise UserError(f'--learner_workers={workers} is a count (the '
                    'launcher\'s); a learner needs every worker\'s '
                    'host:port, e.g. --learner_workers=host0:7000,'
                    'host1:7000')
  if not workers:
    if not tf_config:
      raise UserError('--strategy=multi_worker needs the workers: '
                      '--learner_workers=host:port,... and --learner_index, '
                      'or TF_CONFIG')
    workers, index = _from_tf_config(tf_config)
  elif tf_config and _from_tf_config(tf_config) != (tuple(workers), index):
    raise UserError('TF_CONFIG and --learner_workers/--learner_index name '
                    'different clusters; give one of them')
  if not 0 <= index < len(workers):
    raise UserError(f'--learner_index={index} is not an index of the '
                    f'{len(workers)} --learner_workers (0 to '
                    f'{len(workers) - 1})')
  return tuple(workers), index


def _multi_worker(workers: Sequence[str], index: int,
                  worker_timeout_s: float,
                  register_timeout_s: float) -> tf.distribute.Strategy:
  os.environ['TF_CONFIG'] = json.dumps({
      'cluster': {'worker': list(workers)},
      'task': {'type': 'worker', 'index': index}})
  logging.info('learner: worker %d of %d (%s); waiting up to %gs for the '
               'others: %s', index, len(workers), workers[index],
               register_timeout_s, ', '.join(workers))
  compat.configure_worker_coordination(register_timeout_s,
                                       worker_timeout_s)
  # Every worker's collectives in one order (see the function).
  compat.order_sac_critic_variables()
  # TensorFlow logs a line for every all-reduce it launches.
  tf.get_logger().setLevel('WARNING')
  # TensorFlow waits for a peer that never starts forever (its register
  # timeout does not end the first collective): a watchdog does.
  watchdog = process.Watchdog(
      register_timeout_s, 'learner',
      f'learner worker {index} ({workers[index]}): not every one of the '
      f'{len(workers)} workers {", ".join(workers)} joined within '
      f'{register_timeout_s:g}s (--server_timeout_s); start each with the '
      'same --learner_workers and its own --learner_index')
  try:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # The first collective: every worker is there.
    any_worker(strategy, False)
    watchdog.cancel()
  except (tf.errors.OpError, RuntimeError, ValueError) as e:
    raise UserError(f'learner worker {index} ({workers[index]}) could not '
                    f'join the {len(workers)} workers {", ".join(workers)} '
                    f'({op_error_reason(e)}); start every worker with the same '
                    '--learner_workers, each with its own --learner_index') \
        from None
  return strategy


def make_strategy(name: str, tpu: str = '', workers=(), index: int = 0,
                  worker_timeout_s: float = 30.0,
                  register_timeout_s: float = 300.0
                  ) -> tf.distribute.Strategy:
  """default: one device; mirrored: all GPUs, else all logical CPUs; tpu;
  multi_worker: the learner processes of `workers` (or TF_CONFIG)."""
  if name != 'multi_worker' and workers:
    raise UserError('--learner_workers needs --strategy=multi_worker')
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'mirrored':
    gpus = tf.config.list_logical_devices('GPU')
    devices = [d.name for d in gpus] or [
        d.name for d in tf.config.list_logical_devices('CPU')]
    logging.info('MirroredStrategy over %s', devices)
    return tf.distribute.MirroredStrategy(devices=devices)
  if name == 'multi_worker':
    workers, index = worker_cluster(workers, index,
                                    os.environ.get('TF_CONFIG'))
    return _multi_worker(workers, index, worker_timeout_s,
                         register_timeout_s)
  if name == 'tpu':
    if not tpu:
      raise UserError('--strategy=tpu needs --tpu_address=<TPU name or address>')
    try:
      return strategy_utils.get_strategy(tpu=tpu, use_gpu=False)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'cannot connect to TPU {tpu!r}: {one_line(e)}'
                      ) from None
  raise UserError(f'unknown --strategy={name!r}; use default, mirrored, '
                  'multi_worker or tpu')


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_index(strategy: tf.distribute.Strategy) -> int:
  """This worker's index (0, the chief, for a single learner)."""
  if not is_multi_worker(strategy):
    return 0
  return int(strategy.cluster_resolver.task_id)


def num_workers(strategy: tf.distribute.Strategy) -> int:
  if not is_multi_worker(strategy):
    return 1
  return strategy.cluster_resolver.cluster_spec().num_tasks('worker')


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
  """True where `flag` is True on any worker (a collective: every worker
  must call it, at the same point). A single learner: `flag`."""
  if not is_multi_worker(strategy):
    return bool(flag)
  value = _any_fn(strategy)(tf.constant(1.0 if flag else 0.0))
  return bool(value.numpy() > 0)


_ANY_FNS = {}


def _any_fn(strategy):
  if id(strategy) not in _ANY_FNS:
    @tf.function
    def reduce_sum(flag):
      per_replica = strategy.run(lambda: tf.identity(flag))
      return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                             axis=None)
    _ANY_FNS[id(strategy)] = reduce_sum
  return _ANY_FNS[id(strategy)]


def broadcast_from_chief(strategy: tf.distribute.Strategy,
                         variables: Sequence[tf.Variable]) -> None:
  """Gives every worker the chief's values of `variables` (after the chief
  alone restored a checkpoint). A collective, as `any_worker`."""
  if not is_multi_worker(strategy):
    return
  variables = list(variables)

  @tf.function
  def broadcast():
    def replica_fn():
      ctx = tf.distribute.get_replica_context()
      first = tf.equal(ctx.replica_id_in_sync_group, 0)
      return [ctx.all_reduce(
          tf.distribute.ReduceOp.SUM,
          tf.where(first, v, tf.zeros_like(v)) if v.dtype.is_floating or
          v.dtype.is_integer else v) for v in variables]
    return strategy.run(replica_fn)

  values = broadcast()
  for v, value in zip(variables, values):
    v.assign(strategy.experimental_local_results(value)[0])
