"""This project against TF-Agents' own distributed SAC example, on Minitaur.

  python -m bench.reference [--reference_dir=/tmp/tfa_ref] [--window_s=90] \
      [--rounds=2] [--out=FILE]

The reference is tf_agents/experimental/distributed/examples/sac/ of
tensorflow/agents (not in the tf-agents wheel): sac_reverb_server.py,
sac_collect.py and sac_train.py, copied to --reference_dir and run unmodified
as three OS processes. They load their task with `suite_load_fn`, a gin
parameter of `collect` and `train` (default suite_mujoco.load); a gin binding
`import tf_agents.environments.suite_pybullet` (gin runs import statements in
bindings too) registers `suite_pybullet.load` and the PyBullet ids, and
`{collect,train}.suite_load_fn=@suite_pybullet.load` points both at
MinitaurBulletEnv-v0, named by their required --env_name flag (they pass it to
`collect`/`train` explicitly, so it wins over a gin binding of
environment_name). The train job writes the collect policy's specs into the
shared root_dir; the Reverb server and the collect job wait for them
(`train_utils.wait_for_policy`) and the train job waits for the server
(`server_info()` blocks), so the three start together.

Both systems run the same shape, one at a time, every process free to use
every core (nothing pinned): a replay server with a MinSize limiter
(--min_size_to_sample, the reference server's default 1), one collect job /
actor (--initial_collect_steps random-policy steps, sac_collect.py's default
10000), one learner, batch 256, (256, 256) networks, replay capacity 1e6
(the reference server's). This project runs with --project_preset=none, the
flag defaults (the tutorial's settings; no action repeat, so one inserted item
is one simulator step in both systems, which --preset=auto's minitaur preset,
--action_repeat=4, would break), and --train_steps far beyond the window.

Rounds alternate (reference, project, reference, project for --rounds=2);
each starts its system afresh and waits until the table holds the initial
collect and the learner has trained for --warmup_s since then. In the window:

* env steps: inserts into the replay table (each a 2-step item, one env
  step), `server_info()[T].rate_limiter_info.insert_stats.completed` with T
  the reference's `experience` (reverb_replay_buffer.DEFAULT_TABLE) and this
  project's `uniform_table`, read at both ends of the window;
* train steps: the reference's train_step from its `variables` table (its
  learner pushes after every step; ReverbVariableContainer.pull), this
  project's from its learner's published status (`variable_container.
  status`: train_step and the time it was published, every
  --log_interval_s; its variables table is pushed every 100 steps); each
  over the span between its two readings;
* cross-checks: sampled items / batch size per second (the learners' input,
  both systems), and the cores each process (with its children) kept busy.

Neither system's log text is read: the reference's logs are third-party
text, and this project's figures are its status data.

Ratios are project / reference of the medians over rounds (with 2 rounds, the
mean). Prints one JSON document (and writes it to --out if given).
"""

from common import process  # Must precede TensorFlow imports.

import datetime
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
from absl import logging
import reverb
from tf_agents.experimental.distributed import reverb_variable_container
from tf_agents.replay_buffers import reverb_replay_buffer

from bench import fixtures
from launcher.local_cluster import REPO_ROOT, Cluster, free_port
from variable_container import status

REFERENCE_DIR = flags.DEFINE_string(
    'reference_dir', '/tmp/tfa_ref',
    'Directory with TF-Agents\' sac_reverb_server.py, sac_collect.py and '
    'sac_train.py (tf_agents/experimental/distributed/examples/sac/).')
WINDOW_S = flags.DEFINE_float('window_s', 90,
                               'Seconds of each measured window.')
ROUNDS = flags.DEFINE_integer('rounds', 2,
                              'Windows per system, alternating with the other.')
WARMUP_S = flags.DEFINE_float(
    'warmup_s', 15, 'Seconds a system trains on after its initial collect '
    'before its window opens.')
INITIAL_COLLECT_STEPS = flags.DEFINE_integer(
    'initial_collect_steps', 10000,
    'Random-policy env steps of the collect job / actor (sac_collect.py\'s '
    'default).')
MIN_SIZE_TO_SAMPLE = flags.DEFINE_integer(
    'min_size_to_sample', 1,
    'MinSize limiter\'s minimum table size (sac_reverb_server.py\'s default).')
REPLAY_CAPACITY = flags.DEFINE_integer(
    'replay_capacity', 1000000,
    'Replay table capacity (sac_reverb_server.py\'s default).')
BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Training batch size.')
PROJECT_PRESET = flags.DEFINE_string(
    'project_preset', 'none',
    'This project\'s --preset (none: the flag defaults, no action repeat).')
STARTUP_TIMEOUT_S = flags.DEFINE_float(
    'startup_timeout_s', 900, 'Seconds a system may take to start and warm up.')
WORKDIR = flags.DEFINE_string(
    'workdir', '', 'Where logs and root dirs go; empty: a new temporary dir.')
OUT = flags.DEFINE_string('out', '', 'Also write the JSON here.')
BENCH_ENV = fixtures.BENCH_ENV

SYSTEMS = ('reference', 'project')
REFERENCE_SCRIPTS = ('sac_reverb_server.py', 'sac_collect.py', 'sac_train.py')
LOG_INTERVAL_S = 2  # This project's progress (log lines and status).


class _Jobs(Cluster):
  """`launcher.local_cluster.Cluster` that also starts scripts; stops
  process groups.

  A job's liveness is read without reaping it (waitid WNOWAIT): until
  stop_all reaps it, its pid, which is also its process group's id (each job
  starts a session), cannot name anyone else's processes. Jobs get TMPDIR in
  log_dir (Reverb servers keep a temporary checkpoint directory there).
  """

  def __init__(self, log_dir):
    os.makedirs(os.path.join(log_dir, 'tmp'), exist_ok=True)
    super().__init__(log_dir)

  def _env(self):
    return {'TMPDIR': os.path.join(self.log_dir, 'tmp')}

  def start(self, name, module, args):
    return self.spawn(name, [sys.executable, '-m', module] + list(args),
                      env=self._env())

  def start_script(self, name, script, args, cwd):
    return self.spawn(name, [sys.executable, script] + list(args), cwd=cwd,
                      env=self._env())

  def exited(self, name):
    """True when the job's process has exited (it stays unreaped)."""
    try:
      info = os.waitid(os.P_PID, self.procs[name].pid,
                       os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
      return True
    return info is not None

  def check_alive(self):
    for name in self.procs:
      if self.exited(name):
        raise RuntimeError(f'{name} exited:\n{self.tail(name)}')

  def _signal_groups(self, sig):
    for proc in self.procs.values():
      if proc.returncode is None:  # Not reaped: the group id is still ours.
        try:
          os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
          pass

  def stop_all(self):
    self._signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while (time.monotonic() < deadline and
           not all(self.exited(name) for name in self.procs)):
      time.sleep(0.2)
    self._signal_groups(signal.SIGKILL)  # Stragglers, leaders or children.
    for proc in self.procs.values():
      proc.wait()
    for _, log in self._logs.values():
      log.close()


def _table_stats(address, table):
  """(inserts, samples, size) of the replay table, or None if unreachable."""
  try:
    tables = reverb.Client(address).server_info(timeout=5)
  except Exception:  # pylint: disable=broad-except
    return None
  if table not in tables:
    raise RuntimeError(f'the server at {address} has no table {table!r}, '
                       f'only {sorted(tables)}')
  info = tables[table]
  limiter = info.rate_limiter_info
  return (limiter.insert_stats.completed, limiter.sample_stats.completed,
          info.current_size)


def _timed_stats(address, table):
  start = time.time()
  stats = _table_stats(address, table)
  if stats is None:
    raise RuntimeError(f'replay server at {address} does not answer')
  return (start + time.time()) / 2, stats


class _Reference:
  """TF-Agents' example: Reverb server, collect job, train job."""

  name = 'reference'
  roles = ('replay_server', 'collect', 'train')
  table = reverb_replay_buffer.DEFAULT_TABLE  # 'experience'

  def __init__(self, jobs, workdir, env_name):
    self.jobs = jobs
    self.address = f'localhost:{free_port()}'
    self._container = None
    root = os.path.join(workdir, 'root')
    gin_import = ['--gin_bindings=import tf_agents.environments.suite_pybullet']
    clients = [f'--root_dir={root}', f'--env_name={env_name}',
               f'--replay_buffer_server_address={self.address}',
               f'--variable_container_server_address={self.address}',
               '--alsologtostderr'] + gin_import
    scripts = {s: os.path.join(REFERENCE_DIR.value, s)
               for s in REFERENCE_SCRIPTS}
    self.argv = {
        'train': [
            'train.suite_load_fn=@suite_pybullet.load',
            f'train.batch_size={BATCH_SIZE.value}'],
        'collect': [
            'collect.suite_load_fn=@suite_pybullet.load',
            f'collect.initial_collect_steps={INITIAL_COLLECT_STEPS.value}'],
    }
    self.argv = {role: clients + [f'--gin_bindings={b}' for b in bindings]
                 for role, bindings in self.argv.items()}
    self.argv['collect'].append('--task=0')
    self.argv['replay_server'] = [
        f'--root_dir={root}', f'--port={self.address.split(":")[1]}',
        f'--min_table_size_before_sampling={MIN_SIZE_TO_SAMPLE.value}',
        f'--replay_buffer_capacity={REPLAY_CAPACITY.value}',
        '--alsologtostderr']
    # The train job writes the policy specs the other two wait for.
    for role, script in (('train', 'sac_train.py'),
                         ('replay_server', 'sac_reverb_server.py'),
                         ('collect', 'sac_collect.py')):
      jobs.start_script(role, scripts[script], self.argv[role], workdir)

  def train_step(self):
    """(time, train_step) from the variables table, or None before a push."""
    if self._container is None:
      try:
        info = reverb.Client(self.address).server_info(timeout=5)
      except Exception:  # pylint: disable=broad-except
        return None
      if info[reverb_variable_container.DEFAULT_TABLE].current_size < 1:
        return None  # A pull would wait for the first push.
      self._container = reverb_variable_container.ReverbVariableContainer(
          self.address)
    start = time.time()
    step = int(self._container.pull()[
        reverb_variable_container.TRAIN_STEP_KEY].numpy())
    return (start + time.time()) / 2, step

  def details(self):
    return {}


class _Project:
  """This project's replay_server, one actor, one learner."""

  name = 'project'
  roles = ('replay_server', 'actor', 'learner')
  table = 'uniform_table'

  def __init__(self, jobs, workdir, env_name):
    self.jobs = jobs
    port = free_port()
    self.address = f'localhost:{port}'
    common = [f'--env={env_name}', f'--preset={PROJECT_PRESET.value}',
              f'--replay_address={self.address}',
              f'--batch_size={BATCH_SIZE.value}',
              f'--log_interval_s={LOG_INTERVAL_S}']
    self.argv = {
        'replay_server': common + [
            f'--port={port}', '--rate_limiter=min_size',
            f'--min_size_to_sample={MIN_SIZE_TO_SAMPLE.value}',
            f'--replay_capacity={REPLAY_CAPACITY.value}',
            f'--root_dir={workdir}/replay_server'],
        'learner': common + [
            '--train_steps=100000000', f'--root_dir={workdir}/learner'],
        'actor': common + [
            '--task=0', '--num_actors=1', '--max_train_steps=100000000',
            f'--initial_collect_steps={INITIAL_COLLECT_STEPS.value}',
            f'--root_dir={workdir}/actor'],
    }
    for role in ('replay_server', 'learner', 'actor'):
      jobs.start(role, role, self.argv[role])

  def train_step(self):
    """(time published, train_step) of the learner's status, or None."""
    try:
      learner = status.read(reverb.Client(self.address), status.LEARNER)
    except Exception:  # pylint: disable=broad-except
      return None  # The server not serving yet.
    if not learner:
      return None
    return learner['time'], int(learner['train_step'])

  def details(self):
    return {'learner_allocator': _allocator(self.jobs.procs['learner'].pid)}


def _allocator(pid):
  """The malloc process `pid` runs with, read from its environment as
  `common.process.allocator` reads its own: 'jemalloc', another preloaded
  allocator's library name, or 'system' (None if unreadable). The learner
  re-executes itself with jemalloc preloaded, keeping its pid."""
  try:
    with open(f'/proc/{pid}/environ', 'rb') as f:
      environ = dict(entry.split(b'=', 1) for entry in f.read().split(b'\0')
                     if b'=' in entry)
  except OSError:
    return None
  preload = environ.get(b'LD_PRELOAD', b'').decode(errors='replace')
  for library in preload.replace(':', ' ').split():
    name = os.path.basename(library)
    if 'malloc' in name:
      return 'jemalloc' if 'jemalloc' in name else name
  return 'system'


def _warm_up(system, log):
  """Waits for the initial collect, then --warmup_s of training after it."""
  started = time.monotonic()
  deadline = started + STARTUP_TIMEOUT_S.value
  collected_at = training_at = None
  while True:
    system.jobs.check_alive()
    stats = _table_stats(system.address, system.table)
    step = system.train_step()
    now = time.monotonic()
    if (collected_at is None and stats and
        stats[0] >= INITIAL_COLLECT_STEPS.value):
      collected_at = now
      log(f'{system.name}: initial collect in the table after '
          f'{now - started:.0f}s (train_step {step and step[1]})')
    if step and step[1] > 0 and training_at is None:
      training_at = now
    if (collected_at is not None and training_at is not None and
        now - max(collected_at, training_at) >= WARMUP_S.value):
      return {'startup_to_window_s': round(now - started, 1),
              'initial_collect_done_s': round(collected_at - started, 1)}
    if now > deadline:
      tails = '\n'.join(f'--- {name}:\n{system.jobs.tail(name, 15)}'
                        for name in system.jobs.procs)
      raise RuntimeError(f'{system.name} not warmed up in '
                         f'{STARTUP_TIMEOUT_S.value:.0f}s (table {stats}, '
                         f'train_step {step}):\n{tails}')
    time.sleep(2)


def _rate(first, last):
  """Count per second between two (time, count) readings."""
  return (last[1] - first[1]) / (last[0] - first[0])


def _window(system):
  """Rates over one --window_s window of a warmed-up system."""
  jobs = system.jobs
  meter = fixtures.CpuMeter({role: jobs.procs[role].pid
                             for role in system.roles})
  t0, stats0 = _timed_stats(system.address, system.table)
  step0 = system.train_step()
  deadline = time.monotonic() + WINDOW_S.value
  while time.monotonic() < deadline:
    jobs.check_alive()
    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
  t1, stats1 = _timed_stats(system.address, system.table)
  step1 = system.train_step()
  spent = meter.read()
  jobs.check_alive()
  window = t1 - t0
  inserts, samples = stats1[0] - stats0[0], stats1[1] - stats0[1]
  figures = {
      'window_s': round(window, 1),
      'train_steps': step1[1] - step0[1],
      'train_steps_per_s': round(_rate(step0, step1), 2),
      'train_step_span_s': round(step1[0] - step0[0], 1),
      'train_step_at_start': step0[1],
      'env_steps': inserts,
      'env_steps_per_s': round(inserts / window, 2),
      'table_size_at_start': stats0[2],
      'cross_check': {
          'sampled_items_per_s_over_batch_size': round(
              samples / window / BATCH_SIZE.value, 2)},
      'cores_busy': {role: round(spent[role] / spent['wall'], 2)
                     for role in system.roles},
  }
  return figures


def _git(*args):
  try:
    return subprocess.run(['git', '-C', REPO_ROOT] + list(args),
                          capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _median(rounds, system, key):
  return statistics.median(r[key] for r in rounds if r['system'] == system)


def _check_reference_dir():
  """Exits with an error unless --reference_dir holds the three scripts."""
  missing = [s for s in REFERENCE_SCRIPTS
             if not os.path.exists(os.path.join(REFERENCE_DIR.value, s))]
  if missing:
    sys.exit(f'bench.reference: error: {REFERENCE_DIR.value} lacks {missing} '
             '(tensorflow/agents: tf_agents/experimental/distributed/examples/'
             'sac/)')


def _settings():
  """The run's settings, as the JSON's `settings`."""
  return {
      'window_s': WINDOW_S.value, 'rounds': ROUNDS.value,
      'warmup_s': WARMUP_S.value, 'collectors': 1,
      'rate_limiter': 'MinSize',
      'min_size_to_sample': MIN_SIZE_TO_SAMPLE.value,
      'initial_collect_steps': INITIAL_COLLECT_STEPS.value,
      'replay_capacity': REPLAY_CAPACITY.value,
      'batch_size': BATCH_SIZE.value,
      'networks': 'actor (256, 256), critic joint (256, 256) (both)',
      'project_preset': PROJECT_PRESET.value,
  }


def _method():
  """How the figures are read, as the JSON's `method`."""
  return {
      'env_steps': 'replay table (reference: experience, project: '
                   'uniform_table) rate_limiter_info.insert_stats.'
                   'completed at both ends of the window (one 2-step '
                   'item per env step), both systems',
      'train_steps': {
          'reference': 'train_step in the variables table '
                       '(ReverbVariableContainer.pull; pushed every step)',
          'project': 'train_step of the learner\'s published status '
                     '(variable_container.status, every '
                     f'{LOG_INTERVAL_S} s), with its publish time'},
      'ratio': 'project / reference of the medians over rounds',
  }


def _reference_info():
  """The reference's scripts and how they run, as the JSON's `reference`."""
  return {
      'dir': REFERENCE_DIR.value,
      'scripts_sha256': {s: _sha256(os.path.join(REFERENCE_DIR.value, s))
                         for s in REFERENCE_SCRIPTS},
      'launch': 'scripts run unmodified; Minitaur through gin bindings: '
                '"import tf_agents.environments.suite_pybullet" and '
                '{collect,train}.suite_load_fn=@suite_pybullet.load, '
                '--env_name=MinitaurBulletEnv-v0 (no wrapper, no '
                'monkeypatch)',
      'differs_from_project': (
          'reward_scale_factor 0.1 (project 1.0); a policy SavedModel '
          'every 1000 train steps (project 5000); the learner pushes the '
          'weights after every train step and the collector pulls them '
          'after every env step (project: the learner pushes every 100 '
          'train steps, 10 per call, and the actor looks every 100 env '
          'steps and pulls only newer weights)'),
  }


def _header(env_name):
  """The results document before any round: machine, code, settings."""
  dirty = _git('status', '--porcelain', '--untracked-files=no')
  return {
      'env': env_name,
      'commit': _git('rev-parse', 'HEAD'),
      'worktree_modified': None if dirty is None else bool(dirty),
      'date': datetime.datetime.now().astimezone().isoformat(
          timespec='seconds'),
      'nproc': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)),
      'placement': 'unpinned: every process may use every core; one system '
                   'runs at a time',
      'settings': _settings(),
      'method': _method(),
      'reference': _reference_info(),
      'project': {},
      'rounds': [],
  }


def _on_term(signum, _frame):
  raise SystemExit(f'bench.reference: {signal.Signals(signum).name}')


def _run_system(system_class, r, results, workdir, env_name, log):
  """Round `r` of one system: start it, warm it up, measure, stop it."""
  name = system_class.name
  run_dir = os.path.join(workdir, f'round{r}_{name}')
  jobs = _Jobs(run_dir)
  try:
    log(f'round {r}: starting {name} in {run_dir}')
    system = system_class(jobs, run_dir, env_name)
    warm = _warm_up(system, log)
    figures = _window(system)
    figures.update(warm)
    figures.update(system.details())
    results['rounds'].append(dict(round=r, system=name, **figures))
    if r == 1:
      results[name]['argv'] = system.argv
    log(f'round {r} {name}: {figures["train_steps_per_s"]} train steps/s, '
        f'{figures["env_steps_per_s"]} env steps/s')
    jobs.stop_all()
    jobs = None
  finally:
    if jobs is not None:
      jobs.stop_all()


def _summary(rounds):
  """Per-round figures, medians and project / reference ratios."""
  summary = {}
  for name in SYSTEMS:
    summary[name] = {
        key: {'per_round': [x[key] for x in rounds if x['system'] == name],
              'median': round(_median(rounds, name, key), 2)}
        for key in ('train_steps_per_s', 'env_steps_per_s')}
  summary['ratio_project_over_reference'] = {
      key: round(summary['project'][key]['median'] /
                 summary['reference'][key]['median'], 2)
      for key in ('train_steps_per_s', 'env_steps_per_s')}
  return summary


def _emit(results):
  """Prints the JSON document, and writes it to --out if given."""
  text = json.dumps(results, indent=2)
  if OUT.value:
    os.makedirs(os.path.dirname(OUT.value) or '.', exist_ok=True)
    with open(OUT.value, 'w') as f:
      f.write(text + '\n')
  print(text)


def main(_):
  logging.set_verbosity(logging.WARNING)
  _check_reference_dir()
  env_name = BENCH_ENV.value
  workdir = WORKDIR.value or tempfile.mkdtemp(prefix='sac-reference-')
  os.makedirs(workdir, exist_ok=True)
  results = _header(env_name)
  t_start = time.perf_counter()

  def log(text):
    print(f'[reference {time.perf_counter() - t_start:5.0f}s] {text}',
          file=sys.stderr, flush=True)

  signal.signal(signal.SIGTERM, _on_term)
  for r in range(1, ROUNDS.value + 1):
    for system_class in (_Reference, _Project):
      _run_system(system_class, r, results, workdir, env_name, log)
  results['summary'] = _summary(results['rounds'])
  results['workdir'] = workdir
  results['bench_seconds'] = round(time.perf_counter() - t_start, 1)
  _emit(results)


if __name__ == '__main__':
  process.run(main, 'bench.reference')
