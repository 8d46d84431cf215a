"""Replay sampling per server core, and the learner's pipeline over 1 and 2 shards.

Each replay server is its own process pinned to one core (`taskset -c`),
filled with synthetic 2-step Minitaur transitions (`bench.fixtures.fill`,
what an actor's observer writes). The sampling client is the learner's input
pipeline alone (`learner.dataset.experience_dataset`, batch 256, no
training), in a process of its own pinned to the cores a placement gives it.
CPU seconds per batch are read from /proc for the servers and the client, so
"items per server-core-second" does not depend on what else the machine runs.

  python -m bench.replay_shards                 # also part of `make bench`
  python -m bench.replay_shards --knobs         # + the pipeline's knobs
"""

from common import process  # Must precede TensorFlow imports.

import json
import os
import resource
import sys
import tempfile
import time

from absl import flags
from absl import logging

from bench import fixtures

flags.DEFINE_list('sample_from', [], 'Client mode: sample these shards, '
                  'print one JSON line of figures and exit.')
flags.DEFINE_list('server_pids', [], 'Client mode: the shards\' server pids '
                  '(their CPU seconds are read over the sampling window).')
flags.DEFINE_float('sample_seconds', 10.0, 'Client mode: sampling window.')
flags.DEFINE_string('pipeline', '{}', 'Client mode: JSON of pipeline knobs '
                    '(parallel_readers, max_in_flight_samples_per_worker, '
                    'num_workers_per_iterator, max_samples_per_stream).')
flags.DEFINE_boolean('knobs', False, 'Also measure the pipeline knobs.')

BATCH = 256
ITEMS_PER_SHARD = 20000


def pipeline(addresses, data_spec, knobs):
  """The learner's pipeline (`learner.dataset.experience_dataset`), with the
  knobs given: `parallel_readers`, `table` and Reverb's TrajectoryDataset
  settings (max_in_flight_samples_per_worker, num_workers_per_iterator,
  max_samples_per_stream)."""
  from learner import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from common import table_names  # pylint: disable=g-import-not-at-top
  knobs = dict(knobs)
  readers = knobs.pop('parallel_readers', 2)
  table = knobs.pop('table', table_names.REPLAY_TABLE)
  return dataset_lib.experience_dataset(
      addresses, table, data_spec, BATCH, 2, parallel_readers=readers,
      reverb_options=knobs)


def _own_cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def sample(env_name, addresses, server_pids, seconds, knobs):
  """Client mode: batches/s and CPU seconds per batch, client and servers."""
  agent = fixtures.build_sac(env_name).agent
  iterator = iter(pipeline(addresses, agent.collect_data_spec, knobs))
  for _ in range(20):  # Warm: streams open, prefetch buffer full.
    next(iterator)
  servers = fixtures.CpuMeter({f'server_{i}': int(p)
                               for i, p in enumerate(server_pids)})
  client_meter = fixtures.CpuMeter({'client': os.getpid()})
  client_start = _own_cpu_seconds()
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  wall = time.perf_counter() - start
  client = _own_cpu_seconds() - client_start
  spent = servers.read()
  server_cpu = sum(v for k, v in spent.items() if k != 'wall')
  server_wait = sum(servers.waited().values())
  client_wait = client_meter.waited()['client']
  return {
      'batches_per_s': round(batches / wall, 1),
      'items_per_s': round(batches * BATCH / wall),
      'server_cpu_ms_per_batch': round(1000 * server_cpu / batches, 2),
      'client_cpu_ms_per_batch': round(1000 * client / batches, 2),
      'server_cores_busy': round(server_cpu / wall, 2),
      'client_cores_busy': round(client / wall, 2),
      # CPU time others took from these processes: a disturbed measurement.
      'server_runqueue_wait_s_per_s': round(server_wait / wall, 2),
      'client_runqueue_wait_s_per_s': round(client_wait / wall, 2),
  }


def run_client(env_name, addresses, server_pids, cpus, knobs=None,
               seconds=10.0, preload=None):
  """Runs `sample` in a client process pinned to `cpus`; its figures.

  `preload`: a shared library for LD_PRELOAD (another malloc) of the client.
  """
  return fixtures.run_pinned_json(
      'bench.replay_shards',
      [f'--bench_env={env_name}', f'--sample_from={",".join(addresses)}',
       f'--server_pids={",".join(str(p) for p in server_pids)}',
       f'--sample_seconds={seconds}', f'--pipeline={json.dumps(knobs or {})}'],
      cpus, preload, 'sampling client')


def start_shards(cluster, env_name, count=2):
  """`count` filled replay servers, shard i pinned to the i-th core from the
  last; (addresses, pids)."""
  cpus = sorted(os.sched_getaffinity(0))
  agent = fixtures.build_sac(env_name).agent
  addresses, pids = [], []
  for i in range(count):
    name = f'replay_shard_{i}'
    addresses.append(fixtures.replay_server(
        cluster, name, env_name, cpus=[cpus[-1 - i % len(cpus)]]))
    pids.append(cluster.procs[name].pid)
    fixtures.fill(addresses[i], agent, ITEMS_PER_SHARD)
  return addresses, pids


def variants():
  """Client variants: {name: (pipeline knobs, LD_PRELOAD library or None)}.

  'default' is what the learner binary runs: its pipeline (one Reverb stream
  per batch) with jemalloc where the machine has it
  (`common.process.prefer_jemalloc`); 'system_malloc', where that differs,
  the same pipeline under glibc's malloc.
  """
  jemalloc = process.jemalloc_path()
  out = {'default': ({}, jemalloc)}
  if jemalloc:
    out['system_malloc'] = ({}, None)
  return out


# The share of its core each shard may use in the shard-bound placements.
SHARD_QUOTA = 0.25


def _placements(shards, pids, cpus, first, log):
  """{name: (shards, their pids, the client's cpus, client variant, shard
  quota)} and the shards' {pid: CpuQuota} ({} where none can be set)."""
  default = variants()['default']
  placements = {
      # (a) one server core, the client on the other core.
      '1_shard_client_own_core': (shards[:1], pids[:1], first, default, None),
      # (b) one server core each; no core is left for the client, which
      # runs wherever the scheduler finds room.
      '2_shards_client_any_core': (shards, pids, cpus, default, None),
      # The 1-shard case under the same client placement as (b).
      '1_shard_client_any_core': (shards[:1], pids[:1], cpus, default, None),
  }
  for name, variant in variants().items():
    if name != 'default':
      placements[f'1_shard_client_own_core_{name}'] = (
          shards[:1], pids[:1], first, variant, None)
      placements[f'2_shards_client_any_core_{name}'] = (
          shards, pids, cpus, variant, None)
  quotas = {}
  if fixtures.CpuQuota.available():
    quotas = {pid: fixtures.CpuQuota(pid, f'shard{i}')
              for i, pid in enumerate(pids)}
    placements['1_shard_bound'] = (shards[:1], pids[:1], cpus, default,
                                   SHARD_QUOTA)
    placements['2_shards_bound'] = (shards, pids, cpus, default, SHARD_QUOTA)
  else:
    log('no writable cgroup CPU controller: shard-bound placements skipped')
  return placements, quotas


def _run_placements(env_name, placements, quotas, log, rounds):
  """{placement: [client figures per round]}; removes the quotas after."""
  figures = {name: [] for name in placements}
  try:
    for r in range(rounds):  # Alternating: drift on a shared machine hits all.
      for name, (addresses, server_pids, client_cpus, variant, quota) in (
          placements.items()):
        for quota_of in quotas.values():
          quota_of.set(quota)
        knob, preload = variant
        f = run_client(env_name, addresses, server_pids, client_cpus, knob,
                       preload=preload)
        log(f'round {r + 1}/{rounds} {name}: {f}')
        figures[name].append(f)
  finally:
    for quota_of in quotas.values():
      quota_of.remove()
  return figures


def _add_ratios(results, quotas):
  """Adds the capacities and 2- over 1-shard ratios to `results`."""
  one = results['1_shard_client_own_core']
  two = results['2_shards_client_any_core']
  results['items_per_server_core_s'] = round(
      BATCH / one['server_cpu_ms_per_batch'] * 1000)
  results['items_per_client_core_s'] = round(
      BATCH / one['client_cpu_ms_per_batch'] * 1000)
  results['2_over_1_shards'] = round(
      two['batches_per_s'] / one['batches_per_s'], 2)
  for name in variants():
    if name != 'default':
      results[f'2_over_1_shards_{name}'] = round(
          results[f'2_shards_client_any_core_{name}']['batches_per_s'] /
          results[f'1_shard_client_own_core_{name}']['batches_per_s'], 2)
  results['2_over_1_shards_same_client_placement'] = round(
      two['batches_per_s'] /
      results['1_shard_client_any_core']['batches_per_s'], 2)
  # What the shards alone could serve, each on a core of its own: cores /
  # server CPU seconds per batch (summed over the shards).
  results['server_bound_batches_per_s'] = {
      '1_shard': round(1000 / one['server_cpu_ms_per_batch'], 1),
      '2_shards': round(2000 / two['server_cpu_ms_per_batch'], 1)}
  results['2_over_1_shards_server_bound'] = round(
      2 * one['server_cpu_ms_per_batch'] / two['server_cpu_ms_per_batch'], 2)
  if quotas:
    results['shard_quota_of_core'] = SHARD_QUOTA
    results['2_over_1_shards_shard_bound'] = round(
        results['2_shards_bound']['batches_per_s'] /
        results['1_shard_bound']['batches_per_s'], 2)


def measure_on(env_name, shards, pids, log=print, rounds=2, knobs=False):
  """Per-core sampling capacity and the 1- vs 2-shard pipeline, one run.

  Shard 0 is pinned to the last core, shard 1 to the first.

  On two cores the sampling client has no core of its own once both hold a
  shard, and it needs more CPU per batch than a shard: the plain 1- vs
  2-shard ratio then measures the client, not the shards. The shard-bound
  placements make the shards the wall, as they are for a learner host with
  cores to spare: each shard limited to SHARD_QUOTA of its core (a cgroup CPU
  quota; skipped where none can be set), the client on both cores.
  """
  cpus = sorted(os.sched_getaffinity(0))
  first = cpus[:1]
  placements, quotas = _placements(shards, pids, cpus, first, log)
  figures = _run_placements(env_name, placements, quotas, log, rounds)
  results = {'placement': {
      'shard_0_cpu': cpus[-1], 'shard_1_cpu': cpus[0],
      '1_shard_client_own_core': first, 'client_any_core': cpus}}
  for name, runs in figures.items():
    # The faster round: the other one lost more CPU to other processes
    # (see the runqueue waits); CPU ms per batch are alike in both.
    results[name] = max(runs, key=lambda f: f['batches_per_s'])
  _add_ratios(results, quotas)
  if knobs:
    results['knobs'] = _knobs(env_name, shards[:1], pids[:1], first, log)
  return results


def measure(env_name, workdir, log=print, knobs=False, rounds=2):
  """`measure_on` two shards that this starts and stops."""
  cluster = fixtures.PinnedCluster(workdir)
  try:
    shards, pids = start_shards(cluster, env_name)
    return measure_on(env_name, shards, pids, log, rounds, knobs)
  finally:
    cluster.stop_all()


KNOBS = [
    {'parallel_readers': 1},
    {'parallel_readers': 4},
    {'max_in_flight_samples_per_worker': 4 * BATCH},
    {'max_in_flight_samples_per_worker': BATCH},
    {'num_workers_per_iterator': 2},
    {'max_samples_per_stream': 4 * BATCH},
]


def _knobs(env_name, addresses, pids, client_cpus, log):
  out = {}
  for knob in [{}] + KNOBS:
    f = run_client(env_name, addresses, pids, client_cpus, knob, seconds=8)
    log(f'knob {knob}: {f}')
    out[json.dumps(knob)] = f
  return out


def main(_):
  logging.set_verbosity(logging.WARNING)
  env_name = fixtures.BENCH_ENV.value
  if flags.FLAGS.sample_from:
    print(json.dumps(sample(env_name, flags.FLAGS.sample_from,
                            flags.FLAGS.server_pids,
                            flags.FLAGS.sample_seconds,
                            json.loads(flags.FLAGS.pipeline))))
    return
  start = time.perf_counter()
  log = lambda text: print(f'[bench {time.perf_counter() - start:4.0f}s] '
                           f'{text}', file=sys.stderr, flush=True)
  results = measure(env_name, tempfile.mkdtemp(prefix='sac-bench-shards-'),
                    log=log, knobs=flags.FLAGS.knobs)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  process.run(main, 'bench.replay_shards')
