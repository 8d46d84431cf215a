"""Losses of the first train steps under a given strategy, for fixed batches.

Run as `python -m tests.mirrored_losses --agent=sac|dqn`; prints one JSON
line: {"default": [...], "mirrored": [...]} with each step's losses.
With `--multi_worker host:port,host:port --index i` it is worker i of a
`--strategy=multi_worker` learner instead (one process per worker, one
replica each, each fed its slice of every global batch): it prints
{"multi_worker": [...], "checksum": [...]}, the losses and a per-variable
sum of its variables after the steps (every worker must hold the same);
worker 0 also prints the "default" losses of one learner on the same
weights and batches.

Both strategies train the project's agent (common/agents.py) with the
learner's `train_step.Learner` (TF-Agents' Learner), as learner/train.py does, from the same initial weights (copied) on
the same global batches (MirroredStrategy splits each over its replicas).

SAC samples actions inside its losses, and two replicas cannot draw the same
random numbers as one device drawing the whole batch. So for SAC the policy's
standard deviation is set to e^-20 and alpha to e^-30: the sampled actions
equal the mean actions to float precision and the entropy terms vanish, which
leaves the critic and actor losses deterministic functions of weights and
batch. (The alpha loss still holds log pi's sampled noise and is not compared;
its gradient's sign, all Adam sees at this scale, is the same either way.)
"""

import json
import sys

from common import process  # Must precede TensorFlow imports.  pylint: disable=unused-import

import numpy as np
import tensorflow as tf

STEPS = 5
BATCH = 32


def main():
  agent_name = _arg('--agent', 'sac')
  workers = _arg('--multi_worker', '')
  from learner import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  if workers:
    # Before any op.
    multi_worker = strategy_lib.make_strategy(
        'multi_worker', workers=tuple(workers.split(',')),
        index=int(_arg('--index', '0')), worker_timeout_s=60,
        register_timeout_s=120)
  else:
    strategy_lib.split_cpu(2)
  # pylint: disable=g-import-not-at-top
  from tf_agents.specs import tensor_spec
  from tf_agents.train.utils import train_utils
  from tf_agents.trajectories import time_step as ts
  from common import agents
  from common import compat
  from common import config as config_lib
  from common import environments
  from learner import train_step as train_step_lib
  # pylint: enable=g-import-not-at-top

  if agent_name == 'dqn':
    env = environments.load_environment(
        'CartPole-v0')
    config = config_lib.DqnConfig(q_fc_layers=(32, 32), batch_size=BATCH)
  else:
    env = environments.load_environment('Pendulum-v1')
    config = config_lib.SacConfig(actor_fc_layers=(32, 32),
                                  critic_joint_fc_layers=(32, 32),
                                  batch_size=BATCH)

  # Fixed batches: mid-episode transitions drawn from the specs.
  tf.random.set_seed(1)
  probe = agents.create_agent(env, config, None, 'probe')
  spec = tensor_spec.add_outer_dim(
      tensor_spec.add_outer_dim(probe.collect_data_spec, 2), BATCH)
  batches = []
  for i in range(STEPS):
    b = tensor_spec.sample_spec_nest(spec, seed=100 + i)
    mid = tf.fill([BATCH, 2], ts.StepType.MID)
    obs = b.observation  # Bounded, but CartPole's bounds reach 3e38.
    b = b._replace(observation=tf.random.stateless_uniform(
        obs.shape, [i, 3], -1.0, 1.0, dtype=obs.dtype),
                   step_type=mid, next_step_type=mid,
                   discount=tf.ones([BATCH, 2]),
                   reward=tf.random.stateless_normal([BATCH, 2], [i, 7]),
                   policy_info=())
    batches.append(b)

  def make_agent(strategy):
    with strategy.scope():
      train_step = train_utils.create_train_step()
      agent = agents.create_agent(env, config, train_step, 'x')
    return agent, train_step

  def initial_weights(agent):
    if agent_name == 'dqn':
      named = compat.dqn_networks(agent)
      nets = [named['q'], named['target_q']]
    else:
      named = compat.sac_networks(agent)
      nets = [named['actor'], named['critic_1'], named['critic_2'],
              named['target_critic_1'], named['target_critic_2']]
    return [v for n in nets for v in n.variables]

  reference, _ = make_agent(tf.distribute.get_strategy())
  # Weights from NumPy's seeded generator: the same in every process (the
  # agents' own random initialization depends on what ran before).
  rng = np.random.RandomState(0)
  for v in initial_weights(reference):
    scale = np.sqrt(3.0 / v.shape[0]) if len(v.shape) == 2 else 0.1
    v.assign(rng.uniform(-scale, scale, v.shape).astype(
        v.dtype.as_numpy_dtype))
  if agent_name == 'sac':
    dense = compat.actor_network_layers(reference).projection_layer
    kernel, bias = dense.kernel.numpy(), dense.bias.numpy()
    half = kernel.shape[1] // 2
    kernel[:, half:] = 0.0
    bias[half:] = -20.0
    dense.kernel.assign(kernel)
    dense.bias.assign(bias)
    compat.sac_log_alpha(reference).assign(-30.0)
  start = [v.numpy() for v in initial_weights(reference)]

  out = {}
  if not workers:
    names = ('default', 'mirrored')
  else:
    # Worker 0 also trains one default learner first (outside the
    # strategy's scope), the reference; its peer waits in its first
    # collective meanwhile.
    names = (('default',) if _arg('--index', '0') == '0' else ()) + (
        'multi_worker',)
  for name in names:
    strategy = (multi_worker if name == 'multi_worker' else
                strategy_lib.make_strategy(name))
    agent, train_step = make_agent(strategy)
    for v, value in zip(initial_weights(agent), start):
      v.assign(value)
    if agent_name == 'sac':
      compat.sac_log_alpha(agent).assign(-30.0)
    dataset = tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda *x: tf.stack(x), *batches))
    dataset = dataset.map(lambda b: (b, ()))
    if name == 'multi_worker':
      iterator = iter(strategy.distribute_datasets_from_function(
          lambda ctx: _worker_slices(dataset, ctx)))
      replicas = strategy.num_replicas_in_sync
    elif name == 'mirrored':
      iterator = iter(strategy.experimental_distribute_dataset(dataset))
      replicas = strategy.num_replicas_in_sync
    else:
      iterator = iter(dataset)
      replicas = 1
    learner = train_step_lib.Learner(
        f'/tmp/mirrored_losses_{name}', train_step, agent,
        experience_dataset_fn=lambda: dataset, strategy=strategy,
        run_optimizer_variable_init=False, summary_interval=10**9,
        checkpoint_interval=-1)
    rows = []
    for _ in range(STEPS):
      info = learner.run(iterations=1, iterator=iterator)
      row = {'loss': float(info.loss.numpy())}
      extra = info.extra._asdict() if hasattr(info.extra, '_asdict') else {}
      for key in ('critic_loss', 'actor_loss', 'td_loss'):
        if key in extra:
          row[key] = float(np.asarray(extra[key]))
      rows.append(row)
    out[name] = rows
    out[f'{name}_replicas'] = replicas
    if name == 'multi_worker':
      out['checksum'] = [float(np.sum(v.numpy(), dtype=np.float64))
                         for v in agent.variables]
  print(json.dumps(out))


def _arg(name: str, default: str) -> str:
  return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def _worker_slices(dataset, ctx):
  """This worker's rows of every global batch (its replica's share)."""
  per = ctx.get_per_replica_batch_size(BATCH)
  start = ctx.input_pipeline_id * per
  return dataset.map(lambda b, info: (tf.nest.map_structure(
      lambda x: x[start:start + per], b), info))


if __name__ == '__main__':
  main()
