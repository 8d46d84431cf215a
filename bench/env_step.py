"""One agent step of a PyBullet environment: the stock client against the
bound one (`common.compat.bind_bullet_client`, which every environment the
system builds gets).

Two copies of the environment as the actors wrap it (`--preset=auto`: for
Minitaur `--action_repeat=4`, one agent step = 4 simulator steps), one with
PyBullet's stock `BulletClient`, one bound, stepped in alternating rounds in
this process with the same random actions and the same seeds (Minitaur's
randomizer draws from `random` and `np.random`), so both take the same
episodes and resets. Each round checks that the two gave the same
observations, rewards and step types, and times each with the process's CPU
clock; the ratio of the sums is the figure (drift hits both).

  python -m bench.env_step [--env_step_rounds=6] [--env_step_steps=400]
"""

from common import process  # Must precede TensorFlow imports.

import json
import random
import time

from absl import flags
import numpy as np

from bench import fixtures

flags.DEFINE_integer('env_step_rounds', 6, 'Alternating rounds.')
flags.DEFINE_integer('env_step_steps', 400, 'Agent steps per round and copy.')


def _episode(env, steps: int, seed: int):
  """`steps` agent steps from a reset: (CPU seconds, what they returned)."""
  random.seed(seed)
  np.random.seed(seed)
  actions = np.random.default_rng(seed)
  spec = env.action_spec()
  env.reset()
  out = []
  start = time.process_time()
  for _ in range(steps):
    t = env.step(actions.uniform(spec.minimum, spec.maximum, spec.shape)
                 .astype(spec.dtype))
    out.append((t.observation.tobytes(), float(t.reward), int(t.step_type)))
  return time.process_time() - start, out


def measure(env_name: str, rounds: int, steps: int, log=print) -> dict:
  """CPU ms per agent step, stock and bound, and their ratio."""
  from bench import collection  # pylint: disable=g-import-not-at-top
  from common import compat  # pylint: disable=g-import-not-at-top
  from common import environments  # pylint: disable=g-import-not-at-top
  options = collection.actor_env_options(env_name)
  envs = {'stock': environments.load_environment(env_name, options=options,
                                                 bind_bullet_client=False),
          'bound': environments.load_environment(env_name, options=options)}
  if not compat.bullet_client_is_bound(envs['bound'].gym.unwrapped):
    raise SystemExit(f'{env_name} has no PyBullet client to bind')
  cpu = {name: 0.0 for name in envs}
  resets = 0
  for r in range(rounds):
    results = {}
    for name, env in envs.items():
      seconds, results[name] = _episode(env, steps, seed=r)
      cpu[name] += seconds
    if results['stock'] != results['bound']:
      raise SystemExit(f'round {r}: the bound client stepped differently')
    resets += sum(step_type == 0 for _, _, step_type in results['stock'])
    log(f'round {r}: ' + ', '.join(
        f'{n} {1000 * cpu[n] / ((r + 1) * steps):.2f} ms' for n in cpu))
  per_step = {n: round(1000 * c / (rounds * steps), 3) for n, c in cpu.items()}
  return {'env': env_name, 'action_repeat': options.action_repeat,
          'agent_steps_per_copy': rounds * steps, 'episode_starts': resets,
          'cpu_ms_per_agent_step': per_step, 'identical': True,
          'stock_over_bound': round(cpu['stock'] / cpu['bound'], 3)}


def main(_):
  print(json.dumps(measure(fixtures.BENCH_ENV.value,
                           flags.FLAGS.env_step_rounds,
                           flags.FLAGS.env_step_steps), indent=2))


if __name__ == '__main__':
  process.run(main, 'bench.env_step')
