"""Collection against cores: 1 actor, 2 actors, 1 actor with 2 env subprocesses.

Pure collection: a replay server that never blocks a writer (MinSize limiter,
min size 1), no learner, the policy weights pushed once. Every actor is a
process pinned to its own core with `taskset -c`; the rate is the replay
table's inserts (one 2-step item per env step, `variable_container.status.
inserted_items`) over a steady window that opens once every actor acts,
all actors running together; env steps per episode are the table's own
episode count over the same window. Of the alternating rounds, the least
disturbed (fastest) one counts.

The actor's efficiency is CPU time per env step, raw loop / actor process
(`actor_efficiency_pinned`): on a shared machine, other processes take wall
time from the pinned raw loop and actor alike, not CPU time; the wall-clock
ratio is reported too (`actor_efficiency_wall`).

Placement (the same in every case, so the cases compare): the replay server
is pinned to the last core. With 1 actor on the first core the server has
its core to itself; with 2 actors the second actor shares its core with the
server (about 800 inserts/s and the weight pulls: the CPU share it takes is
reported as `server_cores_busy`). The raw `env.step` loop that the actor's
efficiency divides by runs in this process's main thread pinned to the
actor's core, the server idle on the other, on the environment wrapped as
the actors' is (their --preset=auto: for Minitaur --action_repeat=4, one
env step = 4 simulator steps). It times env.step and reset apart, and the
reference rate is that of episodes as long as the actor's (the pushed,
untrained policy saturates its actions and Minitaur falls within tens of
steps, while random actions walk for hundreds: with about 60 ms per reset,
the same loop would otherwise compare unlike work).

  python -m bench.collection              # also part of `make bench`
"""

from common import process  # Must precede TensorFlow imports.

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

from absl import flags
from absl import logging
import numpy as np

from bench import fixtures
from common import config as config_lib


@contextlib.contextmanager
def pinned_thread(cpus):
  """Pins the calling thread (Linux affinity is per thread) while inside."""
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cpus)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def actor_env_options(env_name):
  """The wrappers an actor started with no flags but --env puts on it: its
  --preset=auto's (Minitaur: --action_repeat=4, so one env step of an actor
  is 4 simulator steps)."""
  from common import presets  # pylint: disable=g-import-not-at-top
  name = presets.resolve('auto', env_name)
  values = presets.read(name) if name else {}
  return config_lib.EnvOptions(
      max_episode_steps=int(values.get('max_episode_steps', 0)),
      action_repeat=int(values.get('action_repeat', 1)))


def raw_env_costs(env_name, steps=1500, clock=time.perf_counter):
  """Seconds per env.step and per reset, random actions, in this thread.

  The environment is wrapped as the actors' is (`actor_env_options`).
  `clock`: time.perf_counter (wall) or time.thread_time (this thread's CPU,
  which other processes on the core do not inflate).
  """
  from common import environments  # pylint: disable=g-import-not-at-top
  env = environments.load_environment(env_name,
                                      options=actor_env_options(env_name))
  spec = env.action_spec()
  rng = np.random.default_rng(0)
  actions = [rng.uniform(spec.minimum, spec.maximum, spec.shape).astype(
      spec.dtype) for _ in range(steps)]
  env.reset()
  for action in actions[:100]:  # Warm.
    env.step(action)
  step_s, reset_s, resets = 0.0, 0.0, 0
  for action in actions:
    start = clock()
    last = env.step(action).is_last()
    step_s += clock() - start
    if last:
      start = clock()
      env.reset()
      reset_s += clock() - start
      resets += 1
  for _ in range(max(0, 10 - resets)):  # Enough resets to time.
    start = clock()
    env.reset()
    reset_s += clock() - start
    resets += 1
  return step_s / steps, reset_s / resets


def raw_rate(costs, steps_per_episode=None):
  """env steps/s of the raw loop for episodes of this length (None: no
  resets)."""
  step_s, reset_s = costs
  if not steps_per_episode:
    return 1 / step_s
  return steps_per_episode / (steps_per_episode * step_s + reset_s)


def _summaries_opened(cluster, name, task):
  """True once actor `name` opened its TensorBoard summary writer
  (`<root_dir>/actor_<task>/`): it does when it starts acting with the
  pushed weights. Raises if the actor exited."""
  if cluster.procs[name].poll() is not None:
    raise RuntimeError(f'{name} exited ({cluster.procs[name].returncode}):\n'
                       f'{cluster.tail(name)}')
  directory = os.path.join(cluster.log_dir, name, f'actor_{task}')
  return os.path.isdir(directory) and any(
      f.startswith('events.out.tfevents.') for f in os.listdir(directory))


def _table_counts(address):
  """(items ever inserted, episodes ever written) of the replay table.

  One item per env step (2-step items, stride 1); Reverb counts an episode
  (a writer's `end_episode`) once one of its items is in the table, and
  keeps counting it after its items are removed.
  """
  import reverb  # pylint: disable=g-import-not-at-top
  from common import table_names  # pylint: disable=g-import-not-at-top
  from variable_container import status  # pylint: disable=g-import-not-at-top
  info = reverb.Client(address).server_info(timeout=10)[
      table_names.REPLAY_TABLE]
  return (status.inserted_items([address]),
          info.num_episodes + info.num_deleted_episodes)


def _actor_name(task, actors, extra):
  """The cluster name of actor `task` of `actors`, from its extra flags."""
  name = f'actor_{task}_of_{len(actors)}_{"_".join(extra) or "1_env"}'
  return '_'.join(filter(None, ''.join(
      c if c.isalnum() else ' ' for c in name.replace('--', '')).split()))


def _start_actors(cluster, env_name, address, actors, log_interval_s):
  """Starts one actor process per (cpus, extra flags); their names."""
  names = []
  for task, (cpus, extra) in enumerate(actors):
    name = _actor_name(task, actors, extra)
    cluster.start(name, 'actor', [
        f'--env={env_name}', f'--replay_address={address}', f'--task={task}',
        f'--num_actors={len(actors)}', '--initial_collect_steps=0',
        '--max_train_steps=1000000000', f'--log_interval_s={log_interval_s}',
        '--validate_env_episodes=0', f'--root_dir={cluster.log_dir}/{name}'] +
                  list(extra), cpus=cpus)
    names.append(name)
  return names


def _collect_window(cluster, names, address, server_pid, rss, seconds,
                    warmup_s):
  """Waits for the actors to act, then counts over the window.

  Returns (start counts, start time, end counts, end time, CPU spent, run
  queue waits).
  """
  deadline = time.monotonic() + 180
  while not all(_summaries_opened(cluster, n, task)
                for task, n in enumerate(names)):
    if time.monotonic() > deadline:
      raise RuntimeError(f'actors {names} not acting within 180s')
    time.sleep(0.5)
  time.sleep(warmup_s)  # Past the first batch of policy calls and resets.
  start_counts, start = _table_counts(address), time.perf_counter()
  meter = fixtures.CpuMeter(dict(
      {n: cluster.procs[n].pid for n in names}, server=server_pid))
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if rss is not None:
      rss.sample({n: cluster.procs[n].pid for n in names})
    time.sleep(1)
  spent = meter.read()
  waited = meter.waited()
  end_counts, end = _table_counts(address), time.perf_counter()
  for task, n in enumerate(names):
    _summaries_opened(cluster, n, task)  # Raises if one died meanwhile.
  return start_counts, start, end_counts, end, spent, waited


def collect_rate(cluster, env_name, address, actors, server_pid, rss=None,
                 seconds=24.0, log_interval_s=3.0, warmup_s=3.0):
  """Actors running together; their summed env steps/s and CPU use.

  `actors` is a list of (cpus, extra flags), one per actor process. The rate
  is the replay table's inserts over a `seconds` window that opens
  `warmup_s` after every actor started acting; the actors share the table,
  so per-actor shares of it are not told apart (their CPU use is).
  """
  names = _start_actors(cluster, env_name, address, actors, log_interval_s)
  try:
    start_counts, start, end_counts, end, spent, waited = _collect_window(
        cluster, names, address, server_pid, rss, seconds, warmup_s)
  finally:
    for n in names:
      if cluster.procs[n].poll() is None:
        cluster.signal(n)
    for n in names:
      cluster.wait(n, 60)
  steps = end_counts[0] - start_counts[0]
  episodes = end_counts[1] - start_counts[1]
  rate = steps / (end - start)
  actors_cpu = sum(spent[n] for n in names)
  return {
      'env_steps_per_s': round(rate, 1),
      'env_steps_per_episode': round(steps / max(episodes, 1), 1),
      'actor_cores_busy': [round(spent[n] / spent['wall'], 2) for n in names],
      # The actors' CPU (with their env subprocesses) per env step collected.
      'cpu_ms_per_env_step': round(
          1000 * actors_cpu / spent['wall'] / rate, 3),
      'server_cores_busy': round(spent['server'] / spent['wall'], 3),
      # Seconds per second that the actors' threads waited for a CPU: time
      # other processes took from them (a disturbed measurement).
      'actor_runqueue_wait_s_per_s': [
          round(waited[n] / spent['wall'], 2) for n in names],
  }


# Seconds per second an actor's threads may wait for a CPU in a round that
# counts as undisturbed: about 0.05 alone on its core, 0.15-0.3 for an actor
# with env subprocesses (its own processes and the server share the cores),
# 0.35-0.65 when another process is pinned to the same core.
MAX_RUNQUEUE_WAIT = 0.3


def _undisturbed(figures):
  return max(figures['actor_runqueue_wait_s_per_s']) <= MAX_RUNQUEUE_WAIT


def _cases(cpus, first, last, with_4_envs):
  """{case: [(cpus, extra flags) per actor]}."""
  cases = {
      '1_actor': [(first, [])],
      '2_actors': [(first, []), (last, [])],
      # Its main process and environment subprocesses may use both cores.
      '1_actor_2_env_processes': [(cpus, ['--env_processes=2'])],
  }
  if with_4_envs:
    cases['1_actor_4_envs'] = [(first, ['--envs_per_actor=4'])]
  return cases


def _round(cluster, env_name, address, server_pid, rss, log, cases, first,
           figures, raw, raw_cpu, r, rounds):
  """Round `r`: the raw env loop, then every case; appends to the lists."""
  with pinned_thread(first):
    raw.append(raw_env_costs(env_name))
    raw_cpu.append(raw_env_costs(env_name, clock=time.thread_time))
  log(f'round {r + 1}/{rounds} raw env on cpu {first}: '
      f'{1000 * raw[-1][0]:.2f} ms per step, {1000 * raw[-1][1]:.0f} ms '
      f'per reset (CPU: {1000 * raw_cpu[-1][0]:.2f}, '
      f'{1000 * raw_cpu[-1][1]:.0f})')
  for case, actors in cases.items():
    f = collect_rate(cluster, env_name, address, actors, server_pid, rss)
    log(f'round {r + 1}/{rounds} {case}: {f}')
    figures[case].append(f)


def _extra_rounds(cluster, env_name, address, server_pid, rss, log, cases,
                  figures):
  """A case whose every round lost CPU to other processes (another
  engineer's benchmark pinned to the same core) gets up to 2 more."""
  for case, actors in cases.items():
    for extra in range(2):
      if any(_undisturbed(f) for f in figures[case]):
        break
      f = collect_rate(cluster, env_name, address, actors, server_pid, rss)
      log(f'extra round {extra + 1} {case} (the others were disturbed): '
          f'{f}')
      figures[case].append(f)


def _run_cases(env_name, workdir, rss, log, rounds, cases, first, last):
  """All rounds of all cases on a fresh replay server: (figures per case,
  raw env costs, raw env CPU costs), one entry a round."""
  cluster = fixtures.PinnedCluster(workdir)
  figures = {case: [] for case in cases}
  raw, raw_cpu = [], []
  try:
    address = fixtures.replay_server(cluster, 'replay_server', env_name,
                                     cpus=last)
    server_pid = cluster.procs['replay_server'].pid
    fixtures.push_weights(env_name, address)
    for r in range(rounds):  # Alternating: drift on a shared machine hits all.
      _round(cluster, env_name, address, server_pid, rss, log, cases, first,
             figures, raw, raw_cpu, r, rounds)
    _extra_rounds(cluster, env_name, address, server_pid, rss, log, cases,
                  figures)
    if rss is not None:
      rss.sample({'replay_server': server_pid})
  finally:
    cluster.stop_all()
  return figures, raw, raw_cpu


# The least disturbed round of each: on a shared machine other processes
# only ever slow a round down (their share shows as cores_busy < 1 and
# run-queue waits).
def _best_rate(figures, case):
  return max(f['env_steps_per_s'] for f in figures[case])


def _steps_per_episode(figures, case):
  return statistics.median(f['env_steps_per_episode'] for f in figures[case])


def _raw_figures(env_name, cpus, first, last, figures, costs, cpu_costs):
  """The placement and the raw env loop's figures."""
  # The raw loop for the actor's own episodes: the untrained policy
  # saturates its actions and Minitaur falls within tens of steps, so
  # resets (about 100 ms each) weigh far more than with random actions.
  reference = raw_rate(costs, _steps_per_episode(figures, '1_actor'))
  return {
      'placement': {
          'replay_server_cpu': last[0], 'raw_env_loop_cpu': first[0],
          '1_actor_cpus': first, '2_actors_cpus': [first, last],
          '1_actor_2_env_processes_cpus': cpus},
      'raw_env_action_repeat': actor_env_options(env_name).action_repeat,
      'raw_env_ms_per_step': round(1000 * costs[0], 3),
      'raw_env_ms_per_reset': round(1000 * costs[1], 1),
      'raw_env_steps_per_s_no_resets': round(raw_rate(costs), 1),
      'actor_env_steps_per_episode': _steps_per_episode(figures, '1_actor'),
      'raw_env_steps_per_s_at_actor_episodes': round(reference, 1),
      'raw_env_cpu_ms_per_step': round(1000 * cpu_costs[0], 3),
      'raw_env_cpu_ms_per_reset': round(1000 * cpu_costs[1], 1),
      'rounds': figures,
  }


def _ratios(results, cases, figures, costs, cpu_costs, with_4_envs):
  """Adds the best rates and the ratios to `results`."""
  one = _best_rate(figures, '1_actor')
  reference = raw_rate(costs, _steps_per_episode(figures, '1_actor'))
  for case in cases:
    results[f'{case}_env_steps_per_s'] = round(_best_rate(figures, case), 1)
  results['2_actors_over_1'] = round(_best_rate(figures, '2_actors') / one, 3)
  results['2_env_processes_over_1_actor'] = round(
      _best_rate(figures, '1_actor_2_env_processes') / one, 3)
  results['actor_efficiency_wall'] = round(one / reference, 3)
  results['actor_efficiency_vs_raw_no_resets'] = round(one / raw_rate(costs),
                                                       3)
  # The same ratio in CPU time per env step (raw loop / actor process):
  # what other processes on a shared machine took does not enter it, so
  # this is the headline figure.
  actor_cpu_ms = min(f['cpu_ms_per_env_step'] for f in figures['1_actor'])
  results['actor_cpu_ms_per_env_step'] = actor_cpu_ms
  results['actor_efficiency_pinned'] = round(
      1000 / raw_rate(cpu_costs, _steps_per_episode(figures, '1_actor')) /
      actor_cpu_ms, 3)
  if with_4_envs:
    results['actor_efficiency_4_envs_pinned'] = round(
        1000 / raw_rate(cpu_costs,
                        _steps_per_episode(figures, '1_actor_4_envs')) /
        min(f['cpu_ms_per_env_step'] for f in figures['1_actor_4_envs']),
        3)


def measure(env_name, workdir, rss=None, log=print, rounds=2,
            with_4_envs=True):
  """Raw env rate, 1 and 2 actors, 1 actor with 2 env processes; ratios."""
  cpus = sorted(os.sched_getaffinity(0))
  first, last = cpus[:1], cpus[-1:]
  cases = _cases(cpus, first, last, with_4_envs)
  figures, raw, raw_cpu = _run_cases(env_name, workdir, rss, log, rounds,
                                     cases, first, last)
  costs = (min(c[0] for c in raw), min(c[1] for c in raw))
  cpu_costs = (min(c[0] for c in raw_cpu), min(c[1] for c in raw_cpu))
  results = _raw_figures(env_name, cpus, first, last, figures, costs,
                         cpu_costs)
  _ratios(results, cases, figures, costs, cpu_costs, with_4_envs)
  return results


def main(_):
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  log = lambda text: print(f'[bench {time.perf_counter() - start:4.0f}s] '
                           f'{text}', file=sys.stderr, flush=True)
  results = measure(flags.FLAGS.bench_env, tempfile.mkdtemp(
      prefix='sac-bench-collection-'), log=log, rounds=flags.FLAGS.rounds)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  flags.DEFINE_integer('rounds', 2, 'Rounds of all cases, alternating.')
  process.run(main, 'bench.collection')
