"""Benchmarks of the distributed system against its own parts and the tutorial loop.

python -m bench.run [--out=bench/results.json] [--env=MinitaurBulletEnv-v0]

Every ratio is measured within one run of this command (rates on a shared
machine drift between runs). Prints one JSON document and writes it to --out.
"""

import json
import os
import re
import statistics
import sys
import tempfile
import time

from bench import step_check
from common import process  # Must precede TensorFlow imports.

from absl import flags
from absl import logging
import numpy as np
import reverb
import tensorflow as tf
from tf_agents.policies import py_tf_eager_policy
from tf_agents.policies import random_py_policy
from tf_agents.replay_buffers import reverb_replay_buffer
from tf_agents.replay_buffers import reverb_utils
from tf_agents.train import actor as tfa_actor
from tf_agents.train import learner as tfa_learner

from common import agents
from common import config as config_lib
from common import environments
from learner import dataset as dataset_lib
from bench.tutorial_replay import tutorial_replay
from tests.cluster import Cluster, free_port, processes_naming
from variable_container import VariableContainerClient

OUT = flags.DEFINE_string('out', 'bench/results.json', 'Where to write JSON.')
BENCH_ENV = flags.DEFINE_string('bench_env', 'MinitaurBulletEnv-v0',
                                'Environment to measure.')
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


def raw_env_rate(env_name, steps=1500):
  env = environments.load_environment(env_name)
  spec = env.action_spec()
  rng = np.random.default_rng(0)
  env.reset()
  start = time.perf_counter()
  for _ in range(steps):
    action = rng.uniform(spec.minimum, spec.maximum, spec.shape).astype(
        spec.dtype)
    if env.step(action).is_last():
      env.reset()
  return steps / (time.perf_counter() - start)


def _server(cluster, env_name, extra=()):
  port = free_port()
  cluster.start('replay_server', 'replay_server', [
      f'--env={env_name}', f'--port={port}', '--rate_limiter=min_size',
      '--min_size_to_sample=1', '--replay_capacity=100000',
      '--validate_env_episodes=0'] + list(extra))
  cluster.wait_for_log('replay_server', 'serving tables', 180)
  return f'localhost:{port}'


def _agent(env_name, train_step=None):
  env = environments.load_environment(env_name)
  return env, agents.create_agent(env, SAC, train_step, env_name)


def push_weights(env_name, address):
  _, agent = _agent(env_name)
  variables = agents.shared_variables(agent, agent.train_step_counter)
  agent.train_step_counter.assign(1)
  VariableContainerClient(address, variables, 60).push(variables)


def actor_rate(cluster, env_name, address, rss, envs=1, seconds=45):
  """One actor process's env steps/s while writing to a live server."""
  name = f'actor_{envs}_envs'
  cluster.start(name, 'actor', [f'--envs_per_actor={envs}',
      f'--env={env_name}', f'--replay_address={address}',
      '--initial_collect_steps=0', '--max_train_steps=1000000000',
      '--log_interval_s=5', '--validate_env_episodes=0',
      f'--root_dir={cluster.log_dir}/actor'])
  cluster.wait_for_log(name, 'acting with weights', 180)
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    rss.sample({name: cluster.procs[name].pid,
                'replay_server': cluster.procs['replay_server'].pid})
    time.sleep(1)
  rates = [float(r) for r in re.findall(r'([\d.]+) env steps/s',
                                        cluster.log(name))]
  cluster.signal(name)
  cluster.wait(name, 30)
  steady = rates[1:] or rates
  return statistics.median(steady)


def _fill(address, agent, items):
  """Writes `items` synthetic 2-step transitions; returns items/s."""
  spec = agent.collect_data_spec
  rng = np.random.default_rng(0)

  def sample_step():
    def one(s):
      if s.dtype.is_integer:
        return np.ones(s.shape, s.dtype.as_numpy_dtype)  # MID steps
      return rng.standard_normal(s.shape).astype(s.dtype.as_numpy_dtype)
    return tf.nest.map_structure(one, spec)

  steps = [sample_step() for _ in range(64)]
  observer = reverb_utils.ReverbAddTrajectoryObserver(
      reverb.Client(address), config_lib.REPLAY_TABLE,
      sequence_length=2,
      stride_length=config_lib.STRIDE_LENGTH)
  start = time.perf_counter()
  for i in range(items + 1):
    observer(steps[i % len(steps)])
  observer.flush()
  rate = items / (time.perf_counter() - start)
  observer.close()
  return rate


def _train_rate(learner, train_steps, iterations=10):
  learner.run(iterations=iterations)  # Trace and warm up.
  learner.run(iterations=iterations)
  start = time.perf_counter()
  for _ in range(train_steps // iterations):
    learner.run(iterations=iterations)
  return train_steps // iterations * iterations / (time.perf_counter() - start)


def _batches_per_s(dataset, seconds=10):
  iterator = iter(dataset)
  next(iterator)
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  return batches / (time.perf_counter() - start)


def learner_rates(env_name, address, workdir, train_steps=600):
  """Train steps/s from the live table vs. from one batch held in memory."""
  _, agent = _agent(env_name)

  def live_dataset():  # The learner's own pipeline.
    return dataset_lib.experience_dataset(
        address, config_lib.REPLAY_TABLE, agent.collect_data_spec,
        SAC.batch_size, 2)

  live = tfa_learner.Learner(os.path.join(workdir, 'live'),
                             agent.train_step_counter, agent, live_dataset,
                             checkpoint_interval=-1, summary_interval=0)
  live_rate = _train_rate(live, train_steps)

  batch = next(iter(live_dataset()))
  _, agent2 = _agent(env_name)
  memory = tfa_learner.Learner(
      os.path.join(workdir, 'memory'), agent2.train_step_counter, agent2,
      lambda: tf.data.Dataset.from_tensors(batch).repeat(),
      checkpoint_interval=-1, summary_interval=0)
  memory_rate = _train_rate(memory, train_steps)

  # Sampling alone: batches of 256 the table serves per second, through the
  # learner's pipeline and through TF-Agents' ReverbReplayBuffer.as_dataset.
  sample_rate = _batches_per_s(live_dataset())
  stock = reverb_replay_buffer.ReverbReplayBuffer(
      agent.collect_data_spec, sequence_length=2,
      table_name=config_lib.REPLAY_TABLE, server_address=address)
  stock_rate = _batches_per_s(stock.as_dataset(
      sample_batch_size=SAC.batch_size, num_steps=2).prefetch(50))
  return live_rate, memory_rate, sample_rate, stock_rate


def weight_propagation(env_name, address, rounds=20):
  _, learner_agent = _agent(env_name)
  _, actor_agent = _agent(env_name)
  pushed = agents.shared_variables(learner_agent,
                                   learner_agent.train_step_counter)
  pulled = agents.shared_variables(actor_agent, actor_agent.train_step_counter)
  pusher = VariableContainerClient(address, pushed, 60)
  puller = VariableContainerClient(address, pulled, 60)
  latencies = []
  for k in range(100, 100 + rounds):
    learner_agent.train_step_counter.assign(k)
    start = time.perf_counter()
    pusher.push(pushed)
    while puller.pull_into(pulled) != k:
      pass
    latencies.append((time.perf_counter() - start) * 1000)
  size = sum(v.numpy().nbytes for v in tf.nest.flatten(pulled))
  return statistics.median(latencies), max(latencies), size


def tutorial_loop(env_name, initial_steps, train_steps):
  """The tutorial's single-process loop: 1 collect step + 1 train step."""
  collect_env, agent = _agent(env_name)
  train_step = agent.train_step_counter
  server, dataset, observer = tutorial_replay(agent, 10000, SAC.batch_size)
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
  cluster = Cluster(workdir)
  root = os.path.join(workdir, f'run_{num_actors}')
  start = time.perf_counter()
  cluster.start('launcher', 'launcher', [
      f'--env={env_name}', f'--root_dir={root}', f'--num_actors={num_actors}',
      f'--initial_collect_steps={initial_steps}',
      f'--min_size_to_sample={initial_steps}', f'--train_steps={train_steps}',
      '--with_evaluator=false', '--policy_save_interval=1000000',
      '--log_interval_s=2', '--show_child_logs=false'])
  try:
    while cluster.procs['launcher'].poll() is None:
      pids = {}
      for pid, cmd in processes_naming(root).items():
        role = cmd[2] if len(cmd) > 2 else '?'
        task = next((a for a in cmd if a.startswith('--task=')), '')
        pids[f'{role}{task.replace("--task=", "_")}'] = pid
      rss.sample({f'distributed_{num_actors}/{k}': v for k, v in pids.items()})
      time.sleep(1)
    total_s = time.perf_counter() - start
  finally:
    cluster.stop_all()
  with open(os.path.join(root, 'logs', 'learner.log')) as f:
    m = re.search(r'finished at train_step \d+ .*; ([\d.]+) train steps/s',
                  f.read())
  train_rate = float(m.group(1))
  return total_s, train_steps / train_rate, train_rate


def main(_):
  logging.set_verbosity(logging.WARNING)
  env_name = BENCH_ENV.value
  results = {'env': env_name, 'date': time.strftime('%Y-%m-%d'),
             'machine': f'{os.cpu_count()} cpus'}
  rss = _RssWatch()
  workdir = tempfile.mkdtemp(prefix='sac-bench-')
  t0 = time.perf_counter()

  def report(key, value):
    results[key] = value
    print(f'[bench {time.perf_counter() - t0:5.0f}s] {key}: {value}',
          file=sys.stderr, flush=True)

  cluster = Cluster(workdir)
  try:
    address = _server(cluster, env_name)
    env_rate = raw_env_rate(env_name)
    report('raw_env_steps_per_s', round(env_rate, 1))
    push_weights(env_name, address)
    rate = actor_rate(cluster, env_name, address, rss)
    report('actor_env_steps_per_s', round(rate, 1))
    report('actor_efficiency', round(rate / env_rate, 3))
    rate4 = actor_rate(cluster, env_name, address, rss, envs=4)
    report('actor_env_steps_per_s_4_envs', round(rate4, 1))
    report('actor_efficiency_4_envs', round(rate4 / env_rate, 3))

    _, agent = _agent(env_name)
    insert_rate = _fill(address, agent, 20000)
    report('replay_inserted_transitions_per_s', round(insert_rate, 1))
    live, memory, sample_rate, stock_rate = learner_rates(env_name, address,
                                                          workdir)
    report('learner_train_steps_per_s_live_table', round(live, 1))
    report('learner_train_steps_per_s_in_memory', round(memory, 1))
    report('learner_input_efficiency', round(live / memory, 3))
    report('replay_sampled_batches_256_per_s', round(sample_rate, 1))
    report('tf_agents_as_dataset_batches_256_per_s', round(stock_rate, 1))
    report('replay_sample_capacity_ratio', round(sample_rate / live, 2))
    report('replay_insert_capacity_ratio', round(insert_rate / rate, 2))

    median_ms, max_ms, size = weight_propagation(env_name, address)
    report('weight_push_to_pull_ms_median', round(median_ms, 1))
    report('weight_push_to_pull_ms_max', round(max_ms, 1))
    report('weight_bytes_per_pull', size)
    for key, value in step_check.measure(env_name, address).items():
      report(key, value)
    rss.sample({'replay_server': cluster.procs['replay_server'].pid})
  finally:
    cluster.stop_all()

  initial, steps = 1000, STEPS.value
  init_s, loop_s = tutorial_loop(env_name, initial, steps)
  report('tutorial_loop_seconds', {'initial_collect': round(init_s, 1),
                                   'train_loop': round(loop_s, 1),
                                   'total': round(init_s + loop_s, 1)})
  rss.peak['bench_process (tutorial loop)'] = round(
      _peak_rss_mb(os.getpid()), 1)
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
  # Prioritized replay's cost to the learner (issue: at most 15 % slower).
  from bench import prioritized  # pylint: disable=g-import-not-at-top
  for key, value in prioritized.measure(
      env_name, os.path.join(workdir, 'prioritized')).items():
    report(key, value)
  report('peak_rss_mb', rss.peak)
  report('bench_seconds', round(time.perf_counter() - t0, 1))
  os.makedirs(os.path.dirname(OUT.value) or '.', exist_ok=True)
  with open(OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  process.run(main, 'bench')
