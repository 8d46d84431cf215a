"""Benchmarks of the distributed system against its own parts and the tutorial loop.

python -m bench.run [--out=bench/results/run.json] [--bench_env=MinitaurBulletEnv-v0]

Every ratio is measured within one run of this command (rates on a shared
machine drift between runs). Prints one JSON document and writes it to --out.
Processes whose rates are compared are pinned to cores (`taskset -c`; the
placements are in BENCHMARKS.md and in the JSON): collection against cores
(`bench.collection`), replay sampling per server core and over shards
(`bench.replay_shards`), the learner's input efficiency on one core
(`bench.learner_input`). Rates come from the processes' status data (the
replay table's counts, the learner's published status), never from logs.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import process  # Must precede TensorFlow imports.

from absl import flags
from absl import logging
import reverb
import tensorflow as tf
from tf_agents.policies import py_tf_eager_policy
from tf_agents.policies import random_py_policy
from tf_agents.replay_buffers import reverb_replay_buffer
from tf_agents.train import actor as tfa_actor
from tf_agents.train import learner as tfa_learner

from bench import collection
from bench import fixtures
from bench import learner_input
from bench import pipeline
from bench import prioritized
from bench import replay_shards
from bench import step_check
from common import config as config_lib
from common import table_names
from launcher.local_cluster import free_port, processes_naming
from variable_container.client import VariableContainerClient
from variable_container import status

OUT = flags.DEFINE_string('out', 'bench/results/run.json',
                          'Where to write JSON.')
BENCH_ENV = fixtures.BENCH_ENV
STEPS = flags.DEFINE_integer('baseline_train_steps', 1000,
                             'Train steps of the tutorial-loop comparison.')

SAC = config_lib.SacConfig()  # Tutorial sizes: batch 256, (256, 256).


def _peak_rss_mb(pid):
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    return None


class _RssWatch:
  """Tracks the peak RSS of named processes while they run."""

  def __init__(self):
    self.peak = {}

  def sample(self, pids):
    for name, pid in pids.items():
      rss = _peak_rss_mb(pid)
      if rss is not None:
        self.peak[name] = max(self.peak.get(name, 0), round(rss, 1))


def sampling_rates(env_name, address):
  """Batches of 256 served per second through the learner's pipeline and
  through TF-Agents' ReverbReplayBuffer.as_dataset (unpinned)."""
  agent = fixtures.build_sac(env_name).agent
  sample_rate = learner_input.batches_per_s(
      learner_input.live_dataset_fn(address, agent)())
  stock = reverb_replay_buffer.ReverbReplayBuffer(
      agent.collect_data_spec, sequence_length=2,
      table_name=table_names.REPLAY_TABLE, server_address=address)
  stock_rate = learner_input.batches_per_s(stock.as_dataset(
      sample_batch_size=SAC.batch_size, num_steps=2).prefetch(50))
  return sample_rate, stock_rate


def weight_propagation(env_name, address, rounds=20):
  learner_side = fixtures.build_sac(env_name)
  actor_side = fixtures.build_sac(env_name)
  pushed, pulled = learner_side.variables, actor_side.variables
  pusher = VariableContainerClient(address, pushed, 60)
  puller = VariableContainerClient(address, pulled, 60)
  latencies = []
  for k in range(100, 100 + rounds):
    learner_side.train_step.assign(k)
    start = time.perf_counter()
    pusher.push(pushed)
    while puller.pull_into(pulled) != k:
      pass
    latencies.append((time.perf_counter() - start) * 1000)
  size = sum(v.numpy().nbytes for v in tf.nest.flatten(pulled))
  return statistics.median(latencies), max(latencies), size


def tutorial_loop(env_name, initial_steps, train_steps):
  """The tutorial's single-process loop: 1 collect step + 1 train step."""
  built = fixtures.build_sac(env_name, keep_env=True)
  collect_env, agent, train_step = built.env, built.agent, built.train_step
  server, dataset, observer = fixtures.tutorial_replay(agent, 10000,
                                                       SAC.batch_size)
  start = time.perf_counter()
  tfa_actor.Actor(collect_env,
                  random_py_policy.RandomPyPolicy(collect_env.time_step_spec(),
                                                  collect_env.action_spec()),
                  train_step, steps_per_run=initial_steps,
                  observers=[observer]).run()
  initial_s = time.perf_counter() - start
  collect_actor = tfa_actor.Actor(
      collect_env,
      py_tf_eager_policy.PyTFEagerPolicy(agent.collect_policy,
                                         use_tf_function=True),
      train_step, steps_per_run=1, observers=[observer])
  learner = tfa_learner.Learner(tempfile.mkdtemp(), train_step, agent,
                                lambda: dataset, checkpoint_interval=-1)
  start = time.perf_counter()
  for _ in range(train_steps):
    collect_actor.run()
    learner.run(iterations=1)
  loop_s = time.perf_counter() - start
  server.stop()
  return initial_s, loop_s


def distributed_run(workdir, env_name, num_actors, initial_steps, train_steps,
                    rss):
  """The launcher's cluster to `train_steps`; (seconds in all, seconds of
  training, train steps/s) with the rate from the learner's final status."""
  cluster = fixtures.PinnedCluster(workdir)
  root = os.path.join(workdir, f'run_{num_actors}')
  port = free_port()
  client = reverb.Client(f'localhost:{port}')
  start = time.perf_counter()
  cluster.start('launcher', 'launcher', [
      f'--env={env_name}', f'--root_dir={root}', f'--num_actors={num_actors}',
      f'--port={port}', f'--initial_collect_steps={initial_steps}',
      f'--min_size_to_sample={initial_steps}', f'--train_steps={train_steps}',
      '--with_evaluator=false', '--policy_save_interval=1000000',
      '--log_interval_s=2', '--show_child_logs=false'])
  learner = None
  try:
    while cluster.procs['launcher'].poll() is None:
      pids = {}
      for pid, cmd in processes_naming(root).items():
        role = cmd[2] if len(cmd) > 2 else '?'
        task = next((a for a in cmd if a.startswith('--task=')), '')
        pids[f'{role}{task.replace("--task=", "_")}'] = pid
      rss.sample({f'distributed_{num_actors}/{k}': v for k, v in pids.items()})
      if not (learner or {}).get('finished'):
        # The servers outlive the learner (the launcher stops them last):
        # its final status is read while they still serve it.
        try:
          learner = status.read(client, status.LEARNER, server_info=(
              client.server_info(timeout=2))) or learner
        except Exception:  # pylint: disable=broad-except
          pass  # Not serving yet, or stopping.
      time.sleep(0.5)
    total_s = time.perf_counter() - start
  finally:
    cluster.stop_all()
  if not (learner or {}).get('finished'):
    raise RuntimeError(f'the learner of the {num_actors}-actor run published '
                       f'no final status (last: {learner}); see '
                       f'{root}/logs/learner.log')
  train_rate = round(float(learner['steps_per_s']), 1)
  return total_s, train_steps / train_rate, train_rate


def _write(results):
  os.makedirs(os.path.dirname(OUT.value) or '.', exist_ok=True)
  with open(OUT.value, 'w') as f:
    json.dump(results, f, indent=2)


class _Reporter:
  """Records figures in `results` (writing them as it goes) and logs each."""

  def __init__(self, results):
    self.results = results
    self.t0 = time.perf_counter()

  def elapsed_s(self):
    return time.perf_counter() - self.t0

  def __call__(self, key, value):
    if not isinstance(value, str):  # A string is progress, not a figure.
      self.results[key] = value
      # As it goes: a late failure keeps what was measured.
      _write(self.results)
    print(f'[bench {self.elapsed_s():5.0f}s] {key}: {value}',
          file=sys.stderr, flush=True)


def _bench_collection(env_name, workdir, rss, report):
  """Collection against cores, and the actor's efficiency on one core.

  Returns:
    The 1-actor collection rate (env steps/s).
  """
  c = collection.measure(env_name, os.path.join(workdir, 'collection'), rss,
                         log=lambda text: report('collection', text))
  report('collection_placement', c['placement'])
  report('collection_rounds', c['rounds'])
  rate = c['1_actor_env_steps_per_s']
  for key in ('raw_env_action_repeat', 'raw_env_ms_per_step', 'raw_env_ms_per_reset',
              'actor_env_steps_per_episode',
              'raw_env_steps_per_s_at_actor_episodes',
              'actor_efficiency_vs_raw_no_resets', 'raw_env_cpu_ms_per_step',
              'raw_env_cpu_ms_per_reset', 'actor_cpu_ms_per_env_step',
              'actor_efficiency_wall'):
    report(key, c[key])
  # Simulator steps/s without resets, as this figure was before the actors'
  # action repeat entered the reference (one actor env step = that many).
  report('raw_env_steps_per_s', round(
      c['raw_env_steps_per_s_no_resets'] * c['raw_env_action_repeat'], 1))
  report('actor_env_steps_per_s', rate)
  report('actor_efficiency', c['actor_efficiency_pinned'])
  report('actor_env_steps_per_s_4_envs', c['1_actor_4_envs_env_steps_per_s'])
  report('actor_efficiency_4_envs', c['actor_efficiency_4_envs_pinned'])
  report('collection_2_actors_env_steps_per_s',
         c['2_actors_env_steps_per_s'])
  report('collection_2_actors_over_1', c['2_actors_over_1'])
  report('collection_1_actor_2_env_processes_env_steps_per_s',
         c['1_actor_2_env_processes_env_steps_per_s'])
  report('collection_2_env_processes_over_1_actor',
         c['2_env_processes_over_1_actor'])
  return rate


def _bench_learner_input_pinned(env_name, shards, pids, cpus, report):
  """The learner's input efficiency on the first core, shard 0 serving."""
  # Alternating, twice each: the learner binary's pipeline and allocator
  # ('default'), and the same under the system's malloc.
  order = list(replay_shards.variants()) * 2
  learner_runs = {name: [] for name in order}
  for name in order:
    learner_runs[name].append(learner_input.measure_pinned(
        env_name, shards[0], pids[0], cpus[:1],
        replay_shards.variants()[name]))
    report('learner_input_pinned', f'{name}: {learner_runs[name][-1]}')
  pinned = {name: max(runs, key=lambda f: f['input_efficiency'])
            for name, runs in learner_runs.items()}
  report('learner_input_pinned', pinned)
  report('learner_input_placement', {'replay_server_cpu': cpus[-1],
                                     'learner_cpu': cpus[0]})
  default = pinned['default']
  report('learner_train_steps_per_s_live_table',
         default['train_steps_per_s_live_table'])
  report('learner_train_steps_per_s_in_memory',
         default['train_steps_per_s_in_memory'])
  report('learner_input_efficiency', default['input_efficiency'])
  for name, figures in pinned.items():
    if name != 'default':
      report(f'learner_input_efficiency_{name}',
             figures['input_efficiency'])


def _bench_replay_shards(env_name, workdir, report):
  """Replay sampling per server core, 1 vs 2 shards, and the learner's input
  efficiency, every process pinned: shard 0 on the last core, the learner
  on the first."""
  cpus = sorted(os.sched_getaffinity(0))
  shard_cluster = fixtures.PinnedCluster(os.path.join(workdir, 'shards'))
  try:
    shards, pids = replay_shards.start_shards(shard_cluster, env_name)
    r = replay_shards.measure_on(env_name, shards, pids,
                                 log=lambda text: report('replay_shards', text))
    report('replay_shards', r)
    _bench_learner_input_pinned(env_name, shards, pids, cpus, report)
  finally:
    shard_cluster.stop_all()


def _bench_unpinned(env_name, workdir, rss, report, collect_rate):
  """Unpinned, as before the scale-out benchmarks: one server process, every
  process free to use every core."""
  cluster = fixtures.PinnedCluster(workdir)
  try:
    address = fixtures.replay_server(cluster, 'replay_server', env_name)
    agent = fixtures.build_sac(env_name).agent
    insert_rate = fixtures.fill(address, agent, 20000)
    report('replay_inserted_transitions_per_s', round(insert_rate, 1))
    live, memory, _, _ = learner_input.learner_rates(env_name, address,
                                                     workdir)
    report('learner_train_steps_per_s_live_table_unpinned', round(live, 1))
    report('learner_train_steps_per_s_in_memory_unpinned', round(memory, 1))
    report('learner_input_efficiency_unpinned', round(live / memory, 3))
    sample_rate, stock_rate = sampling_rates(env_name, address)
    report('replay_sampled_batches_256_per_s', round(sample_rate, 1))
    report('tf_agents_as_dataset_batches_256_per_s', round(stock_rate, 1))
    report('replay_sample_capacity_ratio', round(sample_rate / live, 2))
    report('replay_insert_capacity_ratio', round(insert_rate / collect_rate, 2))

    median_ms, max_ms, size = weight_propagation(env_name, address)
    report('weight_push_to_pull_ms_median', round(median_ms, 1))
    report('weight_push_to_pull_ms_max', round(max_ms, 1))
    report('weight_bytes_per_pull', size)
    for key, value in step_check.measure(env_name, address).items():
      report(key, value)
    rss.sample({'replay_server': cluster.procs['replay_server'].pid})
  finally:
    cluster.stop_all()


def _bench_tutorial_loop(env_name, initial, steps, rss, report):
  """The tutorial's single-process loop; returns its (initial, loop) seconds."""
  init_s, loop_s = tutorial_loop(env_name, initial, steps)
  report('tutorial_loop_seconds', {'initial_collect': round(init_s, 1),
                                   'train_loop': round(loop_s, 1),
                                   'total': round(init_s + loop_s, 1)})
  rss.peak['bench_process (tutorial loop)'] = round(
      _peak_rss_mb(os.getpid()), 1)
  return init_s, loop_s


def _bench_distributed(env_name, workdir, initial, steps, tutorial_s, rss,
                       report):
  """The launcher's cluster with 1 and 2 actors, against the tutorial loop."""
  init_s, loop_s = tutorial_s
  for actors in (1, 2):
    total_s, train_s, train_rate = distributed_run(
        workdir, env_name, actors, initial, steps, rss)
    report(f'distributed_{actors}_actor_seconds', {
        'total_with_startup': round(total_s, 1),
        'training_phase': round(train_s, 1),
        'train_steps_per_s': train_rate})
    report(f'baseline_ratio_{actors}_actor', {
        'tutorial_total_over_distributed_total': round(
            (init_s + loop_s) / total_s, 2),
        'tutorial_loop_over_distributed_training_phase': round(
            loop_s / train_s, 2)})


def _bench_prioritized(env_name, workdir, report):
  """Prioritized replay's cost to the learner (issue: at most 15 % slower)."""
  os.makedirs(os.path.join(workdir, 'prioritized'))
  for key, value in prioritized.measure(
      env_name, os.path.join(workdir, 'prioritized')).items():
    report(key, value)


def _bench_pipeline(env_name, workdir, report):
  """Issue 20: every replay layout and pipeline option, and the learner's
  input efficiency on the stock and the packed layout."""
  os.makedirs(os.path.join(workdir, 'pipeline'))
  report('pipeline', pipeline.measure(
      env_name, os.path.join(workdir, 'pipeline'),
      log=lambda *a: print(*a, file=sys.stderr), rounds=1, batches=200))


def _bench_multi_worker(env_name, report):
  """Issue 20: 1 learner vs 2 multi-worker learners, all-reduce cost."""
  out = subprocess.run(
      [sys.executable, '-m', 'bench.multi_worker', '--mw_seconds=10',
       f'--bench_env={env_name}'], capture_output=True, text=True,
      timeout=900, check=False)
  if out.returncode:
    report('multi_worker', {'error': (out.stderr.strip().splitlines()
                                      or ['?'])[-1][:300]})
    return
  report('multi_worker', json.loads(out.stdout))


def main(_):
  logging.set_verbosity(logging.WARNING)
  env_name = BENCH_ENV.value
  results = {'env': env_name, 'date': time.strftime('%Y-%m-%d'),
             'machine': f'{os.cpu_count()} cpus'}
  rss = _RssWatch()
  workdir = tempfile.mkdtemp(prefix='sac-bench-')
  report = _Reporter(results)
  collect_rate = _bench_collection(env_name, workdir, rss, report)
  _bench_replay_shards(env_name, workdir, report)
  _bench_unpinned(env_name, workdir, rss, report, collect_rate)
  initial, steps = 1000, STEPS.value
  tutorial_s = _bench_tutorial_loop(env_name, initial, steps, rss, report)
  _bench_distributed(env_name, workdir, initial, steps, tutorial_s, rss,
                     report)
  _bench_prioritized(env_name, workdir, report)
  _bench_pipeline(env_name, workdir, report)
  _bench_multi_worker(env_name, report)
  report('peak_rss_mb', rss.peak)
  report('bench_seconds', round(report.elapsed_s(), 1))
  _write(results)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  process.run(main, 'bench')
