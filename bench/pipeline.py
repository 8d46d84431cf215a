"""The replay -> learner input pipeline: every layout and knob, one run.

One Reverb server, pinned to the last core, holds a table per way actors can
write items (`actor.writer.StoppableTrajectoryObserver`: the stock layout
with the writer's default chunks of `STOCK_CHUNK_LENGTH` steps, Reverb's
auto-tuned ones or another fixed length, the packed layout with one item or
several a chunk), each filled with the same synthetic 2-step
Minitaur transitions. One client process, pinned to the first core, samples
each table through the learner's pipeline (`learner.dataset`, batch 256, no
training) with each knob, in alternating rounds; CPU seconds per batch are
read for the client (its own) and the server (/proc), so the figures do not
depend on what else the machine runs. Then the learner's input efficiency
(`bench.learner_input.measure_pinned`: train steps/s from the live table over
steps/s from memory, learner on the first core) for the stock and the packed
table.

  python -m bench.pipeline [--pipeline_rounds=2] [--skip_learner]
      [--pipeline_tables=stock_auto,stock]   # only these tables, no knobs
"""

from common import process  # Must precede TensorFlow imports.

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import flags
from absl import logging

from bench import fixtures

flags.DEFINE_string('serve_tables', '', 'Server mode: fill the tables, write '
                    'the port to this file, serve until killed.')
flags.DEFINE_string('sample_cases', '', 'Client mode: JSON [[address, '
                    'server pid], [case, ...]]; one JSON line per case.')
flags.DEFINE_integer('pipeline_rounds', 2, 'Rounds over the cases.')
flags.DEFINE_integer('pipeline_batches', 300, 'Batches measured per case.')
flags.DEFINE_list('pipeline_tables', [], 'Only the cases on these tables '
                  '(default: every case).')
flags.DEFINE_boolean('skip_learner', False, 'Skip the learner efficiency.')
flags.DEFINE_boolean('skip_sampling', False, 'Skip the sampling cases.')

BATCH = 256
ITEMS = 20000

# Table name: (layout, chunk length; None = the writer's default,
# `actor.writer.STOCK_CHUNK_LENGTH` for stock, 1 for packed; 0 = Reverb's
# auto-tuned length, as TF-Agents' observer writes).
TABLES = {
    'stock_auto': ('stock', 0),
    'stock': ('stock', None),
    'stock_chunk_1': ('stock', 1),
    'stock_chunk_2': ('stock', 2),
    'stock_chunk_3': ('stock', 3),
    'stock_chunk_4': ('stock', 4),
    'stock_chunk_8': ('stock', 8),
    'stock_chunk_16': ('stock', 16),
    'packed': ('packed', None),
    'packed_chunk_2': ('packed', 2),
    'packed_chunk_4': ('packed', 4),
    # Not a layout the system writes: the stock signature written by
    # Reverb's legacy `Client.writer`, every column of a step in one chunk
    # (which has no interruptible flush: the actors could not wait on the
    # rate limiter in slices), to show what one chunk per item instead of
    # one per column would save.
    'shared_chunk_2': ('shared', 2),
    'shared_chunk_4': ('shared', 4),
    'shared_chunk_8': ('shared', 8),
}
# Not a layout the system writes: GROUP packed 2-step items per Reverb item
# (sampling groups of consecutive transitions, not transitions), to show what
# the per-item cost left in `packed` is. Sampled only, not unpacked.
GROUP = 8
GROUPED = f'grouped_{GROUP}'

# Sampling cases: {'table': ..., pipeline knobs (bench.replay_shards)}.
CASES = [{'table': name} for name in list(TABLES) + [GROUPED]] + [
    {'table': table, **knob} for table in ('stock_auto', 'packed')
    for knob in ({'parallel_readers': 1}, {'parallel_readers': 4},
                 {'max_samples_per_stream': 4 * BATCH},
                 {'max_samples_per_stream': -1},
                 {'max_in_flight_samples_per_worker': 4 * BATCH,
                  'max_samples_per_stream': 4 * BATCH},
                 {'num_workers_per_iterator': 1},
                 {'num_workers_per_iterator': 2})]


def _serve(env_name, port_file):
  """Server mode: every table of TABLES, filled; serves until killed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import reverb  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from actor import writer  # pylint: disable=g-import-not-at-top
  from common import agents  # pylint: disable=g-import-not-at-top
  agent = fixtures.build_sac(env_name).agent
  signatures = {name: agents.replay_signature(
      agent, 'stock' if layout == 'shared' else layout)
                for name, (layout, _) in TABLES.items()}
  width = agents.packed_width(agent.collect_data_spec)
  signatures[GROUPED] = tf.TensorSpec([GROUP, 2, width], tf.float32)
  server = reverb.Server([
      reverb.Table(name, reverb.selectors.Uniform(), reverb.selectors.Fifo(),
                   max_size=2 * ITEMS,
                   rate_limiter=reverb.rate_limiters.MinSize(1),
                   signature=signature)
      for name, signature in signatures.items()])
  client = reverb.Client(f'localhost:{server.port}')
  rng = np.random.default_rng(0)

  def one(s):
    if s.dtype.is_integer:
      return np.ones(s.shape, s.dtype.as_numpy_dtype)  # MID steps
    return rng.standard_normal(s.shape).astype(s.dtype.as_numpy_dtype)
  steps = [tf.nest.map_structure(one, agent.collect_data_spec)
           for _ in range(64)]
  for name, (layout, chunk_length) in TABLES.items():
    if layout == 'shared':
      with client.writer(max_sequence_length=chunk_length,
                         chunk_length=chunk_length) as w:
        for i in range(ITEMS + 1):
          w.append(steps[i % len(steps)])
          if i:
            w.create_item(name, 2, 1.0)
      continue
    observer = writer.StoppableTrajectoryObserver(
        client, lambda: False, layout=layout, chunk_length=chunk_length,
        table=name)
    for i in range(ITEMS + 1):
      observer(steps[i % len(steps)])
    observer.close()
  rows = [writer.packed_step(step) for step in steps]
  with client.trajectory_writer(num_keep_alive_refs=2) as grouped:
    grouped.configure((), num_keep_alive_refs=2, max_chunk_length=1)
    for i in range(ITEMS // GROUP):
      grouped.append(np.stack([
          np.stack([rows[(i * GROUP + j) % 64], rows[(i * GROUP + j + 1) % 64]])
          for j in range(GROUP)]))
      grouped.create_item(GROUPED, 1.0, grouped.history[-1])
      grouped.flush(16)
  with open(port_file + '.tmp', 'w') as f:
    f.write(str(server.port))
  os.rename(port_file + '.tmp', port_file)
  server.wait()


def _own_cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _sample(env_name, address, server_pid, cases, batches):
  """Client mode: per case, CPU ms per batch of the client and the server."""
  from bench import replay_shards  # pylint: disable=g-import-not-at-top
  agent = fixtures.build_sac(env_name).agent
  for case in cases:
    if case['table'] == GROUPED:
      iterator = iter(_grouped_pipeline(address))
    else:
      iterator = iter(replay_shards.pipeline(
          [address], agent.collect_data_spec, case))
    for _ in range(20):  # Warm: streams open, prefetch buffer full.
      next(iterator)
    server = fixtures.CpuMeter({'server': server_pid})
    mine = fixtures.CpuMeter({'client': os.getpid()})
    client_start = _own_cpu_seconds()
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    wall = time.perf_counter() - start
    client = _own_cpu_seconds() - client_start
    server_cpu = server.read()['server']
    del iterator
    print(json.dumps({
        'case': case,
        'client_cpu_ms_per_batch': round(1000 * client / batches, 3),
        'server_cpu_ms_per_batch': round(1000 * server_cpu / batches, 3),
        'items_per_client_core_s': round(BATCH * batches / client),
        'items_per_server_core_s': round(BATCH * batches / server_cpu),
        'batches_per_s': round(batches / wall, 1),
        'client_runqueue_wait_s_per_s': round(
            mine.waited()['client'] / wall, 2),
    }), flush=True)


def _grouped_pipeline(address):
  """Batches of BATCH transitions from the GROUPED table (two readers, as
  the learner's pipeline), reshaped, not unpacked."""
  import reverb  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  signature = reverb.Client(address).server_info()[GROUPED].signature
  per_batch = BATCH // GROUP

  def reader(_):
    return reverb.TrajectoryDataset(
        address, GROUPED, signature.dtype, signature.shape,
        max_in_flight_samples_per_worker=2 * per_batch,
        max_samples_per_stream=per_batch).batch(per_batch, drop_remainder=True)

  return tf.data.Dataset.range(2).interleave(
      reader, cycle_length=2, num_parallel_calls=2, deterministic=False).map(
          lambda s: tf.reshape(s.data, [BATCH] + signature.shape[1:].as_list())
      ).prefetch(8)


def _start_server(env_name, workdir, cpus):
  port_file = os.path.join(workdir, 'port')
  proc = subprocess.Popen(
      ['taskset', '-c', fixtures.cpu_list(cpus), sys.executable, '-m',
       'bench.pipeline', f'--bench_env={env_name}',
       f'--serve_tables={port_file}'],
      cwd=fixtures.REPO_ROOT, stdout=subprocess.DEVNULL,
      stderr=open(os.path.join(workdir, 'server.log'), 'w'))
  deadline = time.monotonic() + 900
  while not os.path.exists(port_file):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise RuntimeError(f'pipeline server failed; see {workdir}/server.log')
    time.sleep(1)
  with open(port_file) as f:
    return proc, f'localhost:{f.read()}'


def _summary(runs):
  """Per case, the round with the least client CPU per batch (the other
  lost more to the other core's load), and the ratios to stock_auto."""
  best = {}
  for r in runs:
    key = json.dumps(r['case'], sort_keys=True)
    if (key not in best or r['client_cpu_ms_per_batch'] <
        best[key]['client_cpu_ms_per_batch']):
      best[key] = r
  base = best[json.dumps({'table': 'stock_auto'})]
  for r in best.values():
    r['client_cpu_vs_stock_auto'] = round(
        base['client_cpu_ms_per_batch'] / r['client_cpu_ms_per_batch'], 2)
    r['server_cpu_vs_stock_auto'] = round(
        base['server_cpu_ms_per_batch'] / r['server_cpu_ms_per_batch'], 2)
  return list(best.values())


def _measure_sampling(env_name, address, server_pid, cpus, rounds, batches,
                      log):
  """Every case of CASES, `rounds` times over, in one client process."""
  cases = CASES if not flags.FLAGS.pipeline_tables else [
      {'table': t} for t in flags.FLAGS.pipeline_tables]
  out = subprocess.run(
      ['taskset', '-c', str(cpus[0]), sys.executable, '-m',
       'bench.pipeline', f'--bench_env={env_name}',
       f'--pipeline_batches={batches}', '--sample_cases=' + json.dumps(
           [[address, server_pid], cases * rounds])],
      cwd=fixtures.REPO_ROOT, capture_output=True, text=True, check=False,
      env=dict(os.environ, LD_PRELOAD=process.jemalloc_path() or ''))
  if out.returncode:
    raise RuntimeError(f'sampling client failed:\n{out.stderr[-3000:]}')
  runs = [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith('{')]
  for r in runs:
    log(json.dumps(r))
  return _summary(runs)


def _measure_learner(env_name, address, server_pid, cpus, rounds, log):
  """The learner's input efficiency on the stock table (the writer's
  default chunks) and the packed one, every round (under load, the
  wall-clock ratio varies most)."""
  from bench import learner_input  # pylint: disable=g-import-not-at-top
  efficiency = {'stock': [], 'packed': []}
  for _ in range(rounds):  # Alternating: drift hits both.
    for table, runs in efficiency.items():
      f = learner_input.measure_pinned(
          env_name, address, server_pid, cpus[:1],
          ({'table': table}, process.jemalloc_path()))
      log(f'learner on {table}: {f}')
      runs.append(f)
  return efficiency


def measure(env_name, workdir, log=print, rounds=2, batches=300,
            learner=True, sampling=True):
  """Every case of CASES and the learner's efficiency, one run."""
  cpus = sorted(os.sched_getaffinity(0))
  server, address = _start_server(env_name, workdir, cpus[-1:])
  results = {'placement': {'server_cpu': cpus[-1], 'client_cpu': cpus[0]},
             'load_average_at_start': os.getloadavg()}
  try:
    if sampling:
      results['sampling'] = _measure_sampling(
          env_name, address, server.pid, cpus, rounds, batches, log)
    if learner:
      results['learner_input'] = _measure_learner(
          env_name, address, server.pid, cpus, rounds, log)
    results['load_average_at_end'] = os.getloadavg()
  finally:
    server.kill()
    server.wait()
  return results


def main(_):
  logging.set_verbosity(logging.WARNING)
  env_name = fixtures.BENCH_ENV.value
  if flags.FLAGS.serve_tables:
    _serve(env_name, flags.FLAGS.serve_tables)
    return
  if flags.FLAGS.sample_cases:
    (address, server_pid), cases = json.loads(flags.FLAGS.sample_cases)
    _sample(env_name, address, int(server_pid), cases,
            flags.FLAGS.pipeline_batches)
    return
  start = time.perf_counter()
  log = lambda text: print(f'[bench {time.perf_counter() - start:4.0f}s] '
                           f'{text}', file=sys.stderr, flush=True)
  print(json.dumps(measure(
      env_name, tempfile.mkdtemp(prefix='sac-bench-pipeline-'), log,
      flags.FLAGS.pipeline_rounds, flags.FLAGS.pipeline_batches,
      not flags.FLAGS.skip_learner, not flags.FLAGS.skip_sampling), indent=2))


if __name__ == '__main__':
  process.run(main, 'bench.pipeline')
