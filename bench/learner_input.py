"""Learner train steps/s on batches from a live replay table vs. held in memory.

The same TF-Agents Learner (the real SAC train step, batch 256, (256, 256)
networks, 10 train steps per call) trains once on the learner's own input
pipeline (`learner.dataset.experience_dataset`) and once on one batch
repeated from memory; their ratio is the learner's input efficiency.

Fair placement on a 2-core machine (`measure_pinned`): the replay server
pinned to one core, and this measurement in a process of its own pinned to
the other (`taskset -c`), so both learners get exactly one core and the
pipeline's client work (receiving and unpacking items) is charged to the
learner's core, as in a real learner. CPU seconds per train step are read
for the server and the learner process.

  python -m bench.learner_input --learner_input_of=HOST:PORT [--server_pid=N]
"""

from common import process  # Must precede TensorFlow imports.

import json
import os
import time

from absl import flags
from absl import logging

from bench import fixtures

flags.DEFINE_string('learner_input_of', '', 'Measure against this replay '
                    'server, print one JSON line and exit.')
flags.DEFINE_string('learner_pipeline', '{}', 'JSON of pipeline knobs (see '
                    'bench.replay_shards); {}: the learner\'s own pipeline.')
flags.DEFINE_integer('server_pid', 0, 'The replay server\'s pid (its CPU '
                     'seconds are read while the learner trains on it).')
flags.DEFINE_integer('learner_train_steps', 600, 'Train steps measured on '
                     'each input (longer: room for a profiler to attach).')
flags.DEFINE_integer('learner_slices', 6, 'Turns the live and the in-memory '
                     'learner take, alternating (drift on a shared machine '
                     'then weighs on both alike).')


def train_rate(learner, train_steps, iterations=10):
  learner.run(iterations=iterations)  # Trace and warm up.
  learner.run(iterations=iterations)
  start = time.perf_counter()
  for _ in range(train_steps // iterations):
    learner.run(iterations=iterations)
  return train_steps // iterations * iterations / (time.perf_counter() - start)


def batches_per_s(dataset, seconds=10):
  iterator = iter(dataset)
  next(iterator)
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  return batches / (time.perf_counter() - start)


def live_dataset_fn(address, agent, knobs=None):
  """The learner's own pipeline; with `knobs`, with those settings
  (`bench.replay_shards.pipeline`; `{'table': name}` samples that table)."""
  from common import config as config_lib  # pylint: disable=g-import-not-at-top
  from common import table_names  # pylint: disable=g-import-not-at-top
  from learner import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  if knobs:
    from bench import replay_shards  # pylint: disable=g-import-not-at-top
    return lambda: replay_shards.pipeline([address], agent.collect_data_spec,
                                          knobs)
  return lambda: dataset_lib.experience_dataset(
      address, table_names.REPLAY_TABLE, agent.collect_data_spec,
      config_lib.SacConfig().batch_size, 2)


def _alternating(learners, train_steps, meter, slices, iterations=10):
  """{name: (train steps/s, {process: CPU ms per train step} or None)}.

  Each learner trains `train_steps` in `slices` turns, taken in alternation,
  so that what else the machine runs weighs on all of them alike.
  """
  per_slice = max(1, train_steps // slices // iterations)
  wall = dict.fromkeys(learners, 0.0)
  cpu = {name: {} for name in learners}
  for learner in learners.values():
    learner.run(iterations=iterations)  # Warm up.
  for _ in range(slices):
    for name, learner in learners.items():
      m = meter() if meter else None
      start = time.perf_counter()
      for _ in range(per_slice):
        learner.run(iterations=iterations)
      wall[name] += time.perf_counter() - start
      if m:
        for process_name, seconds in m.read().items():
          if process_name != 'wall':
            cpu[name][process_name] = (cpu[name].get(process_name, 0.0) +
                                       seconds)
  steps = slices * per_slice * iterations
  return {name: (steps / wall[name],
                 {p: round(1000 * seconds / steps, 2)
                  for p, seconds in cpu[name].items()} if meter else None)
          for name in learners}


def learner_rates(env_name, address, workdir, train_steps=600, meter=None,
                  knobs=None, slices=1):
  """Train steps/s from the live table and from one batch in memory.

  Returns (live rate, memory rate, live CPU, memory CPU); with `meter` (a
  callable returning a fresh `fixtures.CpuMeter`), each CPU is {process: CPU
  ms per train step}, else None. With `slices` > 1, the two take turns
  (`slices` each).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_agents.train import learner as tfa_learner  # pylint: disable=g-import-not-at-top
  agent = fixtures.build_sac(env_name).agent
  live_dataset = live_dataset_fn(address, agent, knobs)
  live = tfa_learner.Learner(os.path.join(workdir, 'live'),
                             agent.train_step_counter, agent, live_dataset,
                             checkpoint_interval=-1, summary_interval=0)
  live.run(iterations=10)  # Trace outside the metered window.
  batch = next(iter(live_dataset()))
  agent2 = fixtures.build_sac(env_name).agent
  memory = tfa_learner.Learner(
      os.path.join(workdir, 'memory'), agent2.train_step_counter, agent2,
      lambda: tf.data.Dataset.from_tensors(batch).repeat(),
      checkpoint_interval=-1, summary_interval=0)
  memory.run(iterations=10)
  rates = _alternating({'live': live, 'memory': memory}, train_steps, meter,
                       slices)
  (live_rate, live_cpu), (memory_rate, memory_cpu) = (rates['live'],
                                                      rates['memory'])
  return live_rate, memory_rate, live_cpu, memory_cpu


def _measure_here(env_name, address, server_pid, knobs):
  import tempfile  # pylint: disable=g-import-not-at-top
  pids = {'learner': os.getpid()}
  if server_pid:
    pids['server'] = server_pid
  live, memory, live_cpu, memory_cpu = learner_rates(
      env_name, address, tempfile.mkdtemp(prefix='sac-bench-learner-'),
      train_steps=flags.FLAGS.learner_train_steps,
      meter=lambda: fixtures.CpuMeter(pids), knobs=knobs,
      slices=flags.FLAGS.learner_slices)
  return {'train_steps_per_s_live_table': round(live, 1),
          'train_steps_per_s_in_memory': round(memory, 1),
          'input_efficiency': round(live / memory, 3),
          # The same from the learner's CPU per train step: what one core
          # would give without the other processes that share it.
          'input_efficiency_cpu': round(
              memory_cpu['learner'] / live_cpu['learner'], 3),
          'cpu_ms_per_train_step_live': live_cpu,
          'cpu_ms_per_train_step_in_memory': memory_cpu}


def measure_pinned(env_name, address, server_pid, cpus, variant=None):
  """`learner_rates` in a process pinned to `cpus`; its figures.

  `variant`: (pipeline knobs, a shared library to LD_PRELOAD or None), one
  of `bench.replay_shards.variants()`.
  """
  knobs, preload = variant or ({}, None)
  return fixtures.run_pinned_json(
      'bench.learner_input',
      [f'--bench_env={env_name}', f'--learner_input_of={address}',
       f'--server_pid={server_pid}',
       f'--learner_pipeline={json.dumps(knobs)}'],
      cpus, preload, 'learner measurement')


def main(_):
  logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.learner_input_of:
    raise SystemExit('--learner_input_of=HOST:PORT is required')
  print(json.dumps(_measure_here(fixtures.BENCH_ENV.value,
                                 flags.FLAGS.learner_input_of,
                                 flags.FLAGS.server_pid,
                                 json.loads(flags.FLAGS.learner_pipeline))))


if __name__ == '__main__':
  process.run(main, 'bench.learner_input')
