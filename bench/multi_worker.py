"""The multi-worker learner: 1 vs 2 workers, and the all-reduce's cost.

One run, one JSON document on stdout:
- `one_worker`: the learner under `--strategy=default` (the tutorial's SAC
  on Minitaur, batch 256, (256, 256) networks), pinned to core 0: train
  steps/s from one batch held in memory and from a live pre-filled table;
- `two_workers`: two learner processes under `--strategy=multi_worker`
  (MultiWorkerMirroredStrategy, ring all-reduce over localhost gRPC), the
  same global batch of 256 (128 each), worker i pinned to core i: the same
  two rates, and `allreduce_ms_per_train_step`, the time of the all-reduces
  one SAC train step makes (critic, actor and alpha gradients: three calls,
  the same tensors), timed alone;
- `two_over_one`: the ratios.
The replay server is not pinned (this machine has 2 cores): it shares them
with the workers while they sample the live table; in-memory rates have no
server in the loop.

  python -m bench.multi_worker [--mw_seconds=20]
"""

from common import process  # Must precede TensorFlow imports.

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
from absl import logging

from bench import fixtures
from launcher.local_cluster import REPO_ROOT, free_port

flags.DEFINE_string('mw_worker_of', '', 'Internal: measure as a worker '
                    'against this replay server and print one JSON line.')
flags.DEFINE_string('mw_workers', '', 'Internal: the workers (empty: one '
                    'learner under the default strategy).')
flags.DEFINE_integer('mw_index', 0, 'Internal: this worker\'s index.')
flags.DEFINE_float('mw_seconds', 20.0, 'Seconds each rate is measured for.')
flags.DEFINE_integer('mw_fill', 20000, 'Items the table is filled with.')

_ITERATIONS = 10  # Train steps per Learner.run call, as the learner's.


def _rate(learner, seconds: float) -> float:
  learner.run(iterations=_ITERATIONS)  # Trace and warm up.
  learner.run(iterations=_ITERATIONS)
  start, steps = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    learner.run(iterations=_ITERATIONS)
    steps += _ITERATIONS
  return steps / (time.perf_counter() - start)


def _allreduce_ms(strategy, agent, repeats: int = 50) -> float:
  """ms of the all-reduces of one SAC train step (one call per optimizer)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from common import compat  # pylint: disable=g-import-not-at-top
  nets = compat.sac_networks(agent)
  groups = [nets['critic_1'].trainable_variables +
            nets['critic_2'].trainable_variables,
            nets['actor'].trainable_variables,
            [compat.sac_log_alpha(agent)]]

  @tf.function
  def reduce_all():
    def replica_fn():
      ctx = tf.distribute.get_replica_context()
      return [ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                             [tf.zeros_like(v) for v in group])
              for group in groups]
    return strategy.run(replica_fn)

  reduce_all()
  start = time.perf_counter()
  for _ in range(repeats):
    out = reduce_all()
  tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, 'numpy') else t,
                        strategy.experimental_local_results(out)[0])
  return 1000 * (time.perf_counter() - start) / repeats


def _measure_worker(address: str, workers: str, index: int,
                    seconds: float) -> dict:
  """As one worker (or the single learner): its rates, and all-reduce ms."""
  from learner import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  if workers:
    strategy = strategy_lib.make_strategy(
        'multi_worker', workers=tuple(workers.split(',')), index=index,
        worker_timeout_s=60, register_timeout_s=300)
  else:
    strategy = strategy_lib.make_strategy('default')
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from common import build
  from common import config as config_lib
  from common import table_names
  from learner import dataset as dataset_lib
  from learner import train_step as train_step_lib
  # pylint: enable=g-import-not-at-top
  batch = config_lib.SacConfig().batch_size // strategy.num_replicas_in_sync

  def live():
    return dataset_lib.experience_dataset(
        address, table_names.REPLAY_TABLE, agent.collect_data_spec, batch, 2)

  out = {'replicas': strategy.num_replicas_in_sync, 'batch_per_replica': batch}
  for source in ('memory', 'table'):
    built = build.build(fixtures.BENCH_ENV.value, config_lib.SacConfig(),
                        strategy=strategy)
    agent = built.agent
    if source == 'memory':
      one = next(iter(live()))
      dataset_fn = lambda: tf.data.Dataset.from_tensors(one).repeat()  # pylint: disable=cell-var-from-loop
    else:
      dataset_fn = live
    learner = train_step_lib.Learner(
        tempfile.mkdtemp(prefix='sac-bench-mw-'), built.train_step, agent,
        dataset_fn, checkpoint_interval=-1, summary_interval=0,
        strategy=strategy)
    out[f'train_steps_per_s_{source}'] = round(_rate(learner, seconds), 1)
  if workers:
    out['allreduce_ms_per_train_step'] = round(
        _allreduce_ms(strategy, agent), 2)
  return out


def _worker_args(address: str, workers: str, index: int):
  return [sys.executable, '-m', 'bench.multi_worker',
          f'--mw_worker_of={address}', f'--mw_workers={workers}',
          f'--mw_index={index}', f'--mw_seconds={flags.FLAGS.mw_seconds}',
          f'--bench_env={fixtures.BENCH_ENV.value}']


def _run_group(address: str, workers: str, count: int) -> list:
  procs = [subprocess.Popen(
      ['taskset', '-c', str(i)] + _worker_args(address, workers, i),
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(count)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=900)
    if p.returncode:
      raise SystemExit(f'bench.multi_worker: a worker failed: '
                       f'{err.strip().splitlines()[-1] if err else p.returncode}')
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def main(_):
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.mw_worker_of:
    print(json.dumps(_measure_worker(f.mw_worker_of, f.mw_workers,
                                     f.mw_index, f.mw_seconds)))
    return
  with tempfile.TemporaryDirectory(prefix='sac-bench-mw-') as log_dir:
    cluster = fixtures.PinnedCluster(log_dir)
    try:
      address = fixtures.replay_server(cluster, 'replay_server',
                                       fixtures.BENCH_ENV.value)
      fill_rate = fixtures.fill(address,
                                fixtures.build_sac(fixtures.BENCH_ENV.value)
                                .agent, f.mw_fill)
      start = time.perf_counter()
      one = _run_group(address, '', 1)[0]
      workers = ','.join(f'localhost:{free_port()}' for _ in range(2))
      two = _run_group(address, workers, 2)
      elapsed = time.perf_counter() - start
    finally:
      cluster.stop_all()
  chief = two[0]
  result = {
      'cpu_count': os.cpu_count(), 'fill_items_per_s': round(fill_rate),
      'one_worker': one, 'two_workers': two,
      'two_over_one': {
          source: round(chief[f'train_steps_per_s_{source}'] /
                        one[f'train_steps_per_s_{source}'], 3)
          for source in ('memory', 'table')},
      'seconds': round(elapsed, 1)}
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  process.run(main, 'bench.multi_worker')
