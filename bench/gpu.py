"""The accelerator check: one run, one JSON document (issue 20, point 5).

On whatever this machine has (the GPUs TensorFlow sees, else the CPU), the
real SAC learner (the learner's TF-Agents Learner and train step, with the
learner's settings from its own flags: by default batch 256, (256, 256)
networks, 10 train steps per call, Minitaur's specs) is measured under
`--strategy=default` and `--strategy=mirrored`
(`learner.strategy.make_strategy`):

- train steps/s from one batch held in memory (the train step alone);
- train steps/s from a live, pre-filled replay table on this host (a
  replay server process, `bench.fixtures.replay_server`, filled by
  `bench.fixtures.fill`, read by the learner's own pipeline,
  `learner.dataset.experience_dataset`, as `learner.train` builds it);
- the pipeline's batches/s with no training (its distributed dataset
  iterated alone: what it could feed a train step that cost nothing; a
  batch is a global one, every replica's share);
- the device facts: devices, GPU count, TensorFlow's version and CUDA/cuDNN
  build, host CPUs, the malloc.

The ratios (live/in-memory, pipeline/in-memory, mirrored/default) come from
the same run. Each rate is measured for `--seconds_per_measure` after its
train step is traced and warmed up; the default keeps a whole run near 4
minutes on a 2-core CPU host (TensorFlow's start and the tracing included).
A strategy that fails leaves the other's figures in the JSON; the run then
ends with one line and exit 2.

  python -m bench.gpu [--seconds_per_measure=30] [--batch_size=256]
                      [--logical_cpu_devices=N] [--smoke]

`--smoke`: tiny networks and batch, 1.5 s per measure (the test).
`--logical_cpu_devices=N` (the learner's flag) splits the CPU into N logical
devices for `mirrored` where there is no GPU; without it, mirrored runs
over the one CPU device (a measure of the strategy's own overhead).
The JSON goes to stdout, every log line to stderr.

TensorFlow 2.15's wheel sees a GPU only with its CUDA libraries installed
(`pip install "tensorflow[and-cuda]==2.15.1"`); where `nvidia-smi` lists
GPUs that TensorFlow does not see, `device.gpu_note` says so and the run
measures the CPU.
"""

import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import List

from common import process  # Must precede TensorFlow imports.

if __name__ == '__main__':
  # A GPU newer than TensorFlow's kernel binaries (2.15: up to sm_75, and
  # sm_80 PTX; an H100 or H200 is sm_90) JIT-compiles the kernels from PTX
  # at start, for minutes: a cache that holds them all spares a rerun on the
  # same machine that wait.
  os.environ.setdefault('CUDA_CACHE_MAXSIZE', str(4 << 30))
  process.prefer_jemalloc()  # As the learner: re-executes, before TensorFlow.

from absl import flags
from absl import logging

from bench import fixtures
from bench import learner_input
from common import config as config_lib
from common import config_flags  # The learner's flags, as the learner's.
from common.errors import UserError
from common.errors import one_line
from launcher.local_cluster import REPO_ROOT

SECONDS = flags.DEFINE_float(
    'seconds_per_measure', 30.0, 'Seconds each rate is measured for, after '
    'its tracing and warm-up (6 rates; --smoke: 1.5).', lower_bound=0.1)
FILL = flags.DEFINE_integer(
    'fill_items', None, 'Items written to the replay table before measuring '
    '(default 10000, the tutorial\'s replay capacity; --smoke: 500).',
    lower_bound=1)
SMOKE = flags.DEFINE_bool(
    'smoke', False, 'Tiny networks (16, 16) and batch (16), short measures, '
    'where those flags are not given: checks that the script runs, not the '
    'machine.')

_STARTED = time.perf_counter()  # wall_s: TensorFlow's start included.
STRATEGIES = ('default', 'mirrored')
# The rates of each strategy's section of the JSON.
RATE_KEYS = ('train_steps_per_s_in_memory', 'train_steps_per_s_live_table',
             'pipeline_batches_per_s')
SMOKE_AGENT = {'batch_size': 16, 'actor_fc_layers': (16, 16),
               'critic_joint_fc_layers': (16, 16)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures with."""
  learner: config_lib.LearnerConfig  # The learner's, from its flags.
  seconds: float
  fill_items: int
  smoke: bool

  @property
  def agent(self) -> config_lib.SacConfig:
    return self.learner.agent

  @property
  def env_name(self) -> str:
    return self.learner.env_name


def _settings() -> Settings:
  """The learner's settings from its own flags (--env, --batch_size,
  --actor_fc_layers, --logical_cpu_devices, ...), and this check's."""
  learner = config_flags.build(config_lib.LearnerConfig)
  if not isinstance(learner.agent, config_lib.SacConfig):
    raise UserError(f'--agent={learner.agent_name}: bench.gpu measures the '
                    'SAC learner; leave --agent=sac')
  smoke = SMOKE.value
  if smoke:
    agent = dataclasses.replace(learner.agent, **{
        name: value for name, value in SMOKE_AGENT.items()
        if not flags.FLAGS[name].present})
    learner = dataclasses.replace(learner, agent=agent)
  seconds = SECONDS.value
  if smoke and not flags.FLAGS['seconds_per_measure'].present:
    seconds = 1.5
  return Settings(learner=learner, seconds=seconds,
                  fill_items=FILL.value or (500 if smoke else 10000),
                  smoke=smoke)


def _nvidia_smi_gpus():
  """The GPUs the driver lists (`nvidia-smi -L`), whatever TensorFlow sees."""
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                         text=True, timeout=30, check=False)
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def device_facts() -> dict:
  """This machine as TensorFlow sees it (initializes its devices)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  build = dict(tf.sysconfig.get_build_info())
  facts = {
      'tf_version': tf.__version__,
      'cuda_build': bool(build.get('is_cuda_build')),
      'cuda_version': build.get('cuda_version'),
      'cudnn_version': build.get('cudnn_version'),
      'cuda_compute_capabilities': build.get('cuda_compute_capabilities'),
      'gpu_count': len(gpus),
      'gpus': [dict(tf.config.experimental.get_device_details(g),
                    name=g.name) for g in gpus],
      'physical_devices': [d.name for d in tf.config.list_physical_devices()],
      'driver_gpus': _nvidia_smi_gpus(),
      'host_cpus': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)),
      'cpu': platform.processor() or platform.machine(),
      'python': platform.python_version(),
      'malloc': process.allocator(),
  }
  binaries = build.get('cuda_compute_capabilities') or []
  facts['gpu_kernels_jit_from_ptx'] = any(
      'sm_%d%d' % tuple(g['compute_capability']) not in binaries
      for g in facts['gpus'] if g.get('compute_capability'))
  if facts['driver_gpus'] and not gpus:
    facts['gpu_note'] = (
        f'nvidia-smi lists {len(facts["driver_gpus"])} GPU(s) but TensorFlow '
        'sees none: install the CUDA libraries TensorFlow '
        f'{tf.__version__} loads (pip install '
        f'"tensorflow[and-cuda]=={tf.__version__}") into the venv')
    logging.warning('%s', facts['gpu_note'])
  return facts


def _build_agent(s: Settings, env, strategy):
  from common import build  # pylint: disable=g-import-not-at-top
  return build.build(s.env_name, s.agent, env=env, strategy=strategy).agent


def _per_replica_batch(s: Settings, strategy) -> int:
  replicas = strategy.num_replicas_in_sync
  if s.agent.batch_size % replicas:
    raise UserError(f'--batch_size={s.agent.batch_size} does not split over '
                    f'{replicas} replicas; use a multiple of {replicas}')
  return s.agent.batch_size // replicas


def _live_dataset_fn(s: Settings, address: str, agent, batch_size: int):
  """One replica's pipeline, as `learner.train` builds it (one shard)."""
  # pylint: disable=g-import-not-at-top
  from common import agents
  from common import table_names
  from learner import dataset as dataset_lib
  # pylint: enable=g-import-not-at-top
  return lambda: dataset_lib.experience_dataset(
      address, table_names.REPLAY_TABLE, agent.collect_data_spec, batch_size,
      agents.sequence_length(agent),
      parallel_readers=s.learner.sample_parallel_readers,
      prefetch=s.learner.prefetch_batches,
      rate_limiter_timeout_ms=s.learner.sample_timeout_ms,
      alive_bonus=s.learner.alive_bonus, keep_going=lambda: True)


def _in_memory_iterator(strategy, dataset_fn):
  """One batch of `dataset_fn`'s (in host memory), repeated, distributed as
  the Learner distributes its own pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  batch = tf.nest.map_structure(lambda t: t.numpy(),
                                next(iter(dataset_fn())))
  return iter(strategy.distribute_datasets_from_function(
      lambda _: tf.data.Dataset.from_tensors(batch).repeat()))


class _OnIterator:
  """A Learner whose calls train on `iterator`: the same traced train step
  on another input (as `learner.train_step.TrainCalls` gives it a new one),
  called as a Learner is."""

  def __init__(self, learner, iterator):
    self._learner = learner
    self._iterator = iterator

  def run(self, iterations: int):
    return self._learner.run(iterations=iterations, iterator=self._iterator)


def _train_rate(s: Settings, learner) -> float:
  """Train steps/s of `learner`'s calls over s.seconds, once warm.

  Timed, not counted as in `learner_input.train_rate`: a GPU's rate is
  unknown beforehand, and each rate gets the same seconds.
  """
  iterations = s.learner.iterations_per_call
  for _ in range(2):  # Traces (the first input only), then warms up.
    learner.run(iterations=iterations)
  start, steps = time.perf_counter(), 0
  while time.perf_counter() - start < s.seconds:
    learner.run(iterations=iterations)
    steps += iterations
  return steps / (time.perf_counter() - start)


def _pipeline_rate(s: Settings, strategy, dataset_fn) -> float:
  """Batches/s of the distributed pipeline alone, for s.seconds."""
  dataset = strategy.distribute_datasets_from_function(
      lambda _: dataset_fn())
  return learner_input.batches_per_s(dataset, s.seconds)


def _devices(strategy) -> list:
  """The devices a strategy's replicas run on."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if isinstance(strategy, tf.distribute.MirroredStrategy):
    return list(strategy.extended.worker_devices)
  # The default strategy: TensorFlow's first GPU, else its first CPU.
  found = (tf.config.list_logical_devices('GPU') or
           tf.config.list_logical_devices('CPU'))
  return [found[0].name]


def _measure_strategy(s: Settings, name: str, strategy, env, address: str,
                      workdir: str) -> dict:
  """The rates of one strategy: pipeline alone, live table, in memory.

  One Learner trains from both inputs: its train step is traced once.
  """
  # pylint: disable=g-import-not-at-top
  from learner import train_step as train_step_lib
  # pylint: enable=g-import-not-at-top
  batch = _per_replica_batch(s, strategy)
  agent = _build_agent(s, env, strategy)
  live_fn = _live_dataset_fn(s, address, agent, batch)
  out = {'replicas': strategy.num_replicas_in_sync,
         'devices': _devices(strategy), 'per_replica_batch': batch}
  logging.info('%s: the pipeline alone, over %s', name, out['devices'])
  out['pipeline_batches_per_s'] = _pipeline_rate(s, strategy, live_fn)
  gc.collect()  # That pipeline's readers stop with their iterator.
  learner = train_step_lib.Learner(
      os.path.join(workdir, name), agent.train_step_counter, agent, live_fn,
      checkpoint_interval=-1, summary_interval=0, strategy=strategy)
  logging.info('%s: training from the live table', name)
  out['train_steps_per_s_live_table'] = _train_rate(s, learner)
  logging.info('%s: training from one batch in memory', name)
  out['train_steps_per_s_in_memory'] = _train_rate(
      s, _OnIterator(learner, _in_memory_iterator(strategy, live_fn)))
  del learner
  gc.collect()
  for key in RATE_KEYS:
    out[key] = round(out[key], 2)
  logging.info('%s: %s', name, out)
  return out


def _measure_or_error(s: Settings, name: str, strategy, env, address: str,
                      workdir: str) -> dict:
  """`_measure_strategy`'s figures, or {'error': one line}: a strategy that
  fails on this device leaves the other's figures standing."""
  try:
    return _measure_strategy(s, name, strategy, env, address, workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('%s: the measurement failed', name)
    return {'error': f'{type(e).__name__}: {one_line(e, 300)}'}


def _ratio(a: float, b: float) -> float:
  return round(a / b, 3)


def ratios(measured: dict) -> dict:
  """The comparisons each rate was measured for, within this run (those of
  the strategies that measured)."""
  done = {name: r for name, r in measured.items() if 'error' not in r}
  out = {}
  for name, r in done.items():
    out[f'live_over_in_memory_{name}'] = _ratio(
        r['train_steps_per_s_live_table'], r['train_steps_per_s_in_memory'])
    # Below 1, the pipeline alone cannot feed the train step alone.
    out[f'pipeline_over_in_memory_{name}'] = _ratio(
        r['pipeline_batches_per_s'], r['train_steps_per_s_in_memory'])
  if len(done) == len(STRATEGIES):
    d, m = done['default'], done['mirrored']
    for key, short in (('train_steps_per_s_in_memory', 'in_memory'),
                       ('train_steps_per_s_live_table', 'live_table'),
                       ('pipeline_batches_per_s', 'pipeline')):
      out[f'mirrored_over_default_{short}'] = _ratio(m[key], d[key])
  return out


class _CpuOnlyCluster(fixtures.PinnedCluster):
  """A `fixtures.PinnedCluster` whose processes see no GPU.

  The replay server needs none, and TensorFlow in it would reserve most of
  every GPU's memory.
  """

  def spawn(self, name, argv, cwd=REPO_ROOT, env=None):
    return super().spawn(name, argv, cwd,
                         dict(env or {}, CUDA_VISIBLE_DEVICES='-1'))


def start_replay(s: Settings, workdir: str, agent):
  """A replay server process on this host, filled by `fixtures.fill`.

  A process of its own, as a learner host would run one: Reverb reads a
  table in the sampler's own process directly, not over gRPC, sparing the
  pipeline the transport and parsing a learner pays. Returns (cluster,
  address, figures).
  """
  cluster = _CpuOnlyCluster(os.path.join(workdir, 'logs'))
  try:
    address = fixtures.replay_server(cluster, 'replay_server', s.env_name)
    logging.info('replay server at %s; writing %d items', address,
                 s.fill_items)
    rate = fixtures.fill(address, agent, s.fill_items)
  except BaseException:
    cluster.stop_all()
    raise
  return cluster, address, {'items': s.fill_items,
                            'fill_items_per_s': round(rate, 1)}


def _strategies(s: Settings, accelerator: str) -> dict:
  """{name: strategy}, each checked to split the batch; before any op."""
  # pylint: disable=g-import-not-at-top
  from learner import strategy as strategy_lib
  # pylint: enable=g-import-not-at-top
  if accelerator == 'cpu':
    strategy_lib.split_cpu(s.learner.logical_cpu_devices)
  elif s.learner.logical_cpu_devices:
    logging.warning('--logical_cpu_devices=%d ignored: mirrored runs over '
                    'the GPUs', s.learner.logical_cpu_devices)
  strategies = {name: strategy_lib.make_strategy(name) for name in STRATEGIES}
  for strategy in strategies.values():
    _per_replica_batch(s, strategy)
  return strategies


def measure(s: Settings) -> dict:
  """The whole check: device facts, both strategies' rates, their ratios."""
  from common import environments  # pylint: disable=g-import-not-at-top
  facts = device_facts()
  accelerator = 'gpu' if facts['gpu_count'] else 'cpu'
  strategies = _strategies(s, accelerator)
  workdir = tempfile.mkdtemp(prefix='sac-bench-gpu-')
  env = environments.load_environment(s.env_name)
  cluster, address, replay = start_replay(s, workdir,
                                         _build_agent(s, env, None))
  try:
    measured = {name: _measure_or_error(s, name, strategy, env, address,
                                        workdir)
                for name, strategy in strategies.items()}
  finally:
    cluster.stop_all()
    env.close()
    shutil.rmtree(workdir, ignore_errors=True)
  return dict(
      accelerator=accelerator, device=facts,
      settings={'env': s.env_name, 'batch_size': s.agent.batch_size,
                'layers': list(s.agent.actor_fc_layers),
                'iterations_per_call': s.learner.iterations_per_call,
                'seconds_per_measure': s.seconds,
                'logical_cpu_devices': s.learner.logical_cpu_devices,
                'smoke': s.smoke},
      replay=replay, **measured, ratios=ratios(measured),
      wall_s=round(time.perf_counter() - _STARTED, 1))


def failures(result: dict) -> List[str]:
  """What failed: a strategy's error, a rate not a positive finite number."""
  found = []
  for name in STRATEGIES:
    if 'error' in result[name]:
      found.append(f'{name}: {result[name]["error"]}')
      continue
    for key in RATE_KEYS:
      value = result[name][key]
      if not (isinstance(value, float) and math.isfinite(value) and
              value > 0):
        found.append(f'{name} {key} came out {value!r}')
  return found


def main(_):
  logging.set_verbosity(logging.INFO)
  settings = _settings()
  # stdout holds the JSON alone: whatever else writes to it (pybullet's C
  # code prints there) goes to stderr.
  out = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)
  result = measure(settings)
  out.write(json.dumps(result, indent=1) + '\n')
  out.flush()
  failed = failures(result)
  if failed:
    raise UserError('; '.join(failed) + ' (the JSON holds what was measured; '
                    'the log above says why)')


if __name__ == '__main__':
  process.run(main, 'bench.gpu')
