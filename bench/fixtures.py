"""What the benchmarks share: the localhost cluster they start, pinned
processes, the one replay-server helper, synthetic items, the agent they
measure, CPU meters, the tutorial's replay.

A process is pinned by starting it under `taskset -c CPUS`: every thread it
creates later (TensorFlow's pools, gRPC's, an actor's environment
subprocesses) inherits the set, and TensorFlow sizes its pools to it. CPU time
is read from /proc/PID/stat (utime + stime of all the process's threads), so
"CPU seconds per batch" counts a process's own work exactly, whatever else
runs on the machine.

Every benchmark module imports this one and no other benchmark's flags:
shared pieces live here, so the modules import no cycle.
"""

import json
import os
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional

from absl import flags
import numpy as np

from launcher.local_cluster import REPO_ROOT, Cluster, free_port

BENCH_ENV = flags.DEFINE_string('bench_env', 'MinitaurBulletEnv-v0',
                                'Environment to measure.')

_TICKS_PER_S = os.sysconf('SC_CLK_TCK')


def cpu_list(cpus: Iterable[int]) -> str:
  """`taskset -c` syntax: '0' or '0,1'."""
  return ','.join(str(c) for c in sorted(cpus))


def run_pinned_json(module: str, args: List[str], cpus: Iterable[int],
                    preload: Optional[str] = None,
                    what: str = 'measurement') -> dict:
  """Runs `python -m module args` pinned to `cpus`; the JSON of its last line.

  `preload`: a shared library for LD_PRELOAD (another malloc) of the process.
  """
  env = dict(os.environ)
  if preload:
    env['LD_PRELOAD'] = preload
  out = subprocess.run(
      ['taskset', '-c', cpu_list(cpus), sys.executable, '-m', module] + args,
      cwd=REPO_ROOT, capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise RuntimeError(f'{what} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


class PinnedCluster(Cluster):
  """`launcher.local_cluster.Cluster` whose processes may be pinned to CPUs."""

  def __init__(self, log_dir: str):
    os.makedirs(log_dir, exist_ok=True)
    super().__init__(log_dir)

  def start(self, name: str, module: str, args: List[str],
            cpus: Optional[Iterable[int]] = None) -> subprocess.Popen:
    if cpus is None:
      return super().start(name, module, args)
    # taskset execs the program: the pid is the program's own.
    return self.spawn(name, ['taskset', '-c', cpu_list(cpus), sys.executable,
                             '-m', module] + list(args))


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a running process (all its threads)."""
  with open(f'/proc/{pid}/stat') as f:
    # The command name (field 2) may hold spaces; count from its ')'.
    fields = f.read().rpartition(')')[2].split()
  return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def runqueue_wait_seconds(pid: int) -> float:
  """Seconds the process's live threads waited for a CPU while runnable.

  Time another process (another engineer's tests on a shared machine) took
  from a pinned process shows up here, not in its CPU seconds.
  """
  total = 0
  for task in os.listdir(f'/proc/{pid}/task'):
    try:
      with open(f'/proc/{pid}/task/{task}/schedstat') as f:
        total += int(f.read().split()[1])
    except OSError:
      pass  # Exited meanwhile.
  return total / 1e9


def _children(pid: int) -> List[int]:
  try:
    with open(f'/proc/{pid}/task/{pid}/children') as f:
      return [int(c) for c in f.read().split()]
  except OSError:
    return []


def tree_cpu_seconds(pid: int) -> float:
  """CPU seconds of a process and its running descendants."""
  total = 0.0
  pending = [pid]
  while pending:
    p = pending.pop()
    try:
      total += cpu_seconds(p)
    except OSError:
      continue  # Exited meanwhile.
    pending.extend(_children(p))
  return total


class CpuMeter:
  """CPU seconds that each of some processes spent between two readings."""

  def __init__(self, pids: Dict[str, int]):
    self._pids = pids
    self._start = self._read()
    self._start_wait = self._wait()
    self._wall = time.perf_counter()

  def _read(self):
    return {name: tree_cpu_seconds(pid) for name, pid in self._pids.items()}

  def _wait(self):
    return {name: runqueue_wait_seconds(pid)
            for name, pid in self._pids.items()}

  def read(self) -> Dict[str, float]:
    """{name: CPU seconds}, plus 'wall' seconds, since this meter started."""
    now = self._read()
    spent = {name: now[name] - self._start[name] for name in now}
    spent['wall'] = time.perf_counter() - self._wall
    return spent

  def waited(self) -> Dict[str, float]:
    """{name: seconds its threads waited for a CPU} since this meter started."""
    now = self._wait()
    return {name: now[name] - self._start_wait[name] for name in now}


class CpuQuota:
  """A CPU-time quota on one process (a cgroup of its own), settable live.

  `set(0.25)` lets the process run a quarter of one core's time (the kernel
  throttles it within each 10 ms period); `set(None)` lifts the limit. Needs
  a writable cgroup CPU controller (v1 or v2), i.e. root here;
  `CpuQuota.available()` says whether there is one.
  """

  _V2 = '/sys/fs/cgroup/cgroup.controllers'
  _V1 = '/sys/fs/cgroup/cpu'
  PERIOD_US = 10000

  @classmethod
  def _root(cls) -> Optional[str]:
    if os.path.exists(cls._V1 + '/cpu.cfs_quota_us'):
      return cls._V1
    if os.path.exists(cls._V2):
      with open(cls._V2) as f:
        if 'cpu' in f.read().split():
          return os.path.dirname(cls._V2)
    return None

  @classmethod
  def available(cls) -> bool:
    root = cls._root()
    return root is not None and os.access(root, os.W_OK)

  def __init__(self, pid: int, name: str):
    root = self._root()
    self._v1 = root == self._V1
    self._dir = os.path.join(root, f'sac-bench-{name}-{pid}')
    os.makedirs(self._dir, exist_ok=True)
    if not self._v1:  # v2: the parent must hand the cpu controller down.
      with open(os.path.join(root, 'cgroup.subtree_control'), 'w') as f:
        f.write('+cpu')
    self._write('cgroup.procs', str(pid))  # Every thread of the process.
    self.set(None)

  def _write(self, name: str, value: str):
    with open(os.path.join(self._dir, name), 'w') as f:
      f.write(value)

  def set(self, fraction: Optional[float]):
    if self._v1:
      self._write('cpu.cfs_period_us', str(self.PERIOD_US))
      self._write('cpu.cfs_quota_us', '-1' if fraction is None else
                  str(int(fraction * self.PERIOD_US)))
    else:
      quota = 'max' if fraction is None else str(int(fraction * self.PERIOD_US))
      self._write('cpu.max', f'{quota} {self.PERIOD_US}')

  def remove(self):
    """Moves the process back to the root group; deletes this one."""
    try:
      with open(os.path.join(self._dir, 'cgroup.procs')) as f:
        pids = f.read().split()
      for pid in pids:
        with open(os.path.join(os.path.dirname(self._dir), 'cgroup.procs'),
                  'w') as f:
          f.write(pid)
      os.rmdir(self._dir)
    except OSError:
      pass  # The process exited meanwhile, or the group is gone.


def replay_server(cluster: PinnedCluster, name: str, env_name: str,
                  cpus: Optional[Iterable[int]] = None, extra=()) -> str:
  """A replay server process that never blocks a sampler; its address.

  `extra`: more replay_server flags (e.g. --replay=prioritized). Returns
  once the server answers (its table info), not on a log line.
  """
  port = free_port()
  address = f'localhost:{port}'
  cluster.start(name, 'replay_server', [
      f'--env={env_name}', f'--port={port}', '--rate_limiter=min_size',
      '--min_size_to_sample=1', '--replay_capacity=100000',
      '--validate_env_episodes=0'] + list(extra), cpus=cpus)
  cluster.wait_for_server(name, address, 180)
  return address


def build_sac(env_name: str, keep_env: bool = False):
  """The agent every speed benchmark measures: the tutorial's SAC (batch 256,
  (256, 256) networks) for `env_name`, through `common.build.build`."""
  # Imported here: a module that pins a process imports no TensorFlow first.
  from common import build  # pylint: disable=g-import-not-at-top
  from common import config as config_lib  # pylint: disable=g-import-not-at-top
  return build.build(env_name, config_lib.SacConfig(), keep_env=keep_env)


def fill(address: str, agent, items: int, table: Optional[str] = None) -> float:
  """Writes `items` synthetic 2-step transitions as the actors' observer does.

  Returns the items written per second.
  """
  import reverb  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_agents.replay_buffers import reverb_utils  # pylint: disable=g-import-not-at-top
  from common import table_names  # pylint: disable=g-import-not-at-top
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
      reverb.Client(address), table or table_names.REPLAY_TABLE,
      sequence_length=2, stride_length=table_names.STRIDE_LENGTH)
  start = time.perf_counter()
  for i in range(items + 1):
    observer(steps[i % len(steps)])
  observer.flush()
  rate = items / (time.perf_counter() - start)
  observer.close()
  return rate


def push_weights(env_name: str, address: str):
  """Pushes a fresh agent's policy weights once, as of train_step 1.

  Returns that agent: its collect policy is the one the actors act with.
  """
  from variable_container.client import VariableContainerClient  # pylint: disable=g-import-not-at-top
  built = build_sac(env_name)
  built.train_step.assign(1)
  VariableContainerClient(address, built.variables, 60).push(built.variables)
  return built.agent


def tutorial_replay(agent, capacity: int, batch_size: int):
  """The TF-Agents SAC tutorial's replay: a local Reverb server (uniform,
  FIFO, MinSize(1)), its dataset and trajectory observer. Shared by the
  tutorial loop of `bench.run` and `bench.tutorial_loop`."""
  # pylint: disable=g-import-not-at-top
  import reverb
  from tf_agents.replay_buffers import reverb_replay_buffer
  from tf_agents.replay_buffers import reverb_utils
  from common import table_names
  # pylint: enable=g-import-not-at-top
  table = reverb.Table(
      table_names.REPLAY_TABLE,
      max_size=capacity,
      sampler=reverb.selectors.Uniform(),
      remover=reverb.selectors.Fifo(),
      rate_limiter=reverb.rate_limiters.MinSize(1))
  server = reverb.Server([table])
  replay = reverb_replay_buffer.ReverbReplayBuffer(
      agent.collect_data_spec, sequence_length=2,
      table_name=table_names.REPLAY_TABLE, local_server=server)
  dataset = replay.as_dataset(sample_batch_size=batch_size,
                              num_steps=2).prefetch(50)
  observer = reverb_utils.ReverbAddTrajectoryObserver(
      replay.py_client, table_names.REPLAY_TABLE, sequence_length=2,
      stride_length=1)
  return server, dataset, observer
