"""Learner train steps/s on a uniform vs. a prioritized replay table, one run.

Two replay server processes (`--replay=uniform`, `--replay=prioritized`,
MinSize limiter so the learner never waits), each filled with the same
synthetic Minitaur transitions; then the real learner (`learner.train.train`:
its pipeline, pushes and, when prioritized, the importance weights, TD
errors and priority updates) trains on each in turn, alternating, and
reports the median train steps/s of each and their ratio.

  python -m bench.prioritized        # also part of `make bench`
"""

import statistics
import sys
import tempfile
import time

from common import process  # Must precede TensorFlow imports.

from absl import logging
import tensorflow as tf

from bench import fixtures
from common import config as config_lib
from learner import train as train_lib

SAC = config_lib.SacConfig()  # Tutorial sizes: batch 256, (256, 256).


def measure(env_name: str, workdir: str, train_steps: int = 1000,
            rounds: int = 2, items: int = 20000, log=print) -> dict:
  """{'uniform': steps/s, 'prioritized': steps/s, 'ratio': p / u}."""
  cluster = fixtures.PinnedCluster(workdir)
  rates = {'uniform': [], 'prioritized': []}
  try:
    agent = fixtures.build_sac(env_name).agent
    addresses = {}
    for kind in rates:
      addresses[kind] = fixtures.replay_server(
          cluster, f'replay_server_{kind}', env_name, extra=[f'--replay={kind}'])
      fixtures.fill(addresses[kind], agent, items)
    for i in range(rounds):
      for kind in rates:
        settings = config_lib.LearnerConfig(
            env_name=env_name, root_dir=f'{workdir}/{kind}_{i}',
            replay_address=addresses[kind], variable_address=addresses[kind],
            train_steps=train_steps, agent=SAC, policy_save_interval=10**9,
            checkpoint_interval_steps=10**9, log_interval_s=30,
            prioritized=kind == 'prioritized')
        result = train_lib.train(settings, tf.distribute.get_strategy())
        rates[kind].append(result.steps_per_second)
        log(f'round {i + 1}/{rounds} {kind}: '
            f'{result.steps_per_second:.1f} train steps/s')
  finally:
    cluster.stop_all()
  uniform = statistics.median(rates['uniform'])
  prioritized = statistics.median(rates['prioritized'])
  return {'learner_train_steps_per_s_uniform': round(uniform, 1),
          'learner_train_steps_per_s_prioritized': round(prioritized, 1),
          'prioritized_over_uniform': round(prioritized / uniform, 3)}


def main(_):
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  log = lambda text: print(f'[bench {time.perf_counter() - start:4.0f}s] '
                           f'{text}', file=sys.stderr, flush=True)
  for key, value in measure(fixtures.BENCH_ENV.value, tempfile.mkdtemp(
      prefix='sac-bench-prio-'), log=log).items():
    log(f'{key}: {value}')


if __name__ == '__main__':
  process.run(main, 'bench')
