"""The agents, behind one small interface the process roles use.

Each agent is a module of its own (`sac`, `dqn`), registered here for its
config class, with the same five functions:

  create(env, config, train_step, env_name) -> an initialized TF-Agents agent
  collect_config(config, actor_index, num_actors) -> the config actor i
      builds its collect policy from (per-actor exploration)
  train_with_td_errors(agent) -> fn(experience, weights) returning
      (loss_info, |TD error| per item): one train step, and the priorities
  greedy_policy(agent), collect_policy(agent)

and optionally

  numpy_collect_policy(agent, config, seed) -> the collect policy run in
      NumPy on copies of the agent's weights, or None (actors then run the
      TF collect policy)

Everything else the roles need follows from the agent object itself: the
replay item length (`agent.train_sequence_length`), the item signature, the
shared variables. The learner, actors and replay server call only this
module, never an algorithm by name (Acme's builder is the model), so adding
an agent is adding one module and one `register` call.
"""

import types
from typing import Dict, Optional

import tensorflow as tf
from tf_agents.experimental.distributed import reverb_variable_container
from tf_agents.specs import tensor_spec

from common.config import AgentConfig
from common.errors import UserError

_MODULES: Dict[type, types.ModuleType] = {}
_INTERFACE = ('create', 'collect_config', 'train_with_td_errors',
              'greedy_policy', 'collect_policy')


def register(config_type: type, module) -> None:
  """Makes `module` the agent for configs of `config_type`."""
  missing = [name for name in _INTERFACE if not hasattr(module, name)]
  if missing:
    raise TypeError(f'agent module {module.__name__} lacks {missing}')
  _MODULES[config_type] = module


def module_for(config: AgentConfig):
  try:
    return _MODULES[type(config)]
  except KeyError:
    raise UserError(f'no agent registered for {type(config).__name__}; '
                    'known: ' + ', '.join(t.__name__ for t in _MODULES)
                    ) from None


def create_agent(env, config: AgentConfig,
                 train_step: Optional[tf.Variable] = None, env_name: str = ''):
  """The agent `config` names, initialized, for `env`'s specs.

  Call it inside `strategy.scope()` when training under a distribution
  strategy.
  """
  return module_for(config).create(env, config, train_step, env_name)


def collect_config(config: AgentConfig, actor_index: int,
                   num_actors: int) -> AgentConfig:
  """The config actor `actor_index` of `num_actors` collects with."""
  return module_for(config).collect_config(config, actor_index, num_actors)


def train_with_td_errors(agent, config: AgentConfig):
  """`fn(experience, weights) -> (loss_info, |TD error| per item)`."""
  return module_for(config).train_with_td_errors(agent)


def greedy_policy(agent, config: AgentConfig):
  return module_for(config).greedy_policy(agent)


def collect_policy(agent, config: AgentConfig):
  return module_for(config).collect_policy(agent)


def numpy_collect_policy(agent, config: AgentConfig,
                         seed: Optional[int] = None):
  """The collect policy in NumPy, or None where the agent has none.

  The result maps a batch of observations ([B, ...] numpy) to a batch of
  actions, sampled as `collect_policy` samples them, from copies of the
  agent's weights: call its `refresh()` after the variables change (a pull).
  Actors prefer it: a few small matrix products in NumPy cost microseconds,
  a TF policy call a fraction of a millisecond, per environment step.
  """
  make = getattr(module_for(config), 'numpy_collect_policy', None)
  return make(agent, config, seed) if make is not None else None


class NumpyGreedyPolicy:
  """The greedy policy in NumPy: `policy(observations)` maps a batch
  ([B, ...]) to the greedy actions, `refresh()` takes in new weights."""

  def __init__(self, act, refresh):
    self._act = act
    self.refresh = refresh

  def __call__(self, observations):
    return self._act(observations)


def numpy_greedy_policy(agent, config: AgentConfig):
  """The greedy policy (`greedy_policy`) in NumPy, or None where the agent
  has no NumPy collect policy: the evaluator's, whose every environment step
  would otherwise pay for a TF policy call.

  SAC: the squashed mean (`NumpyCollectPolicy.mode`, TF-Agents'
  GreedyPolicy over the actor); DQN: the argmax of the Q-values.
  """
  policy = numpy_collect_policy(agent, config, seed=0)
  greedy = getattr(policy, 'mode', None) or getattr(policy, 'greedy', None)
  if greedy is None:
    return None
  return NumpyGreedyPolicy(greedy, policy.refresh)


def sequence_length(agent) -> int:
  """Steps per replay item: 2 for (s, a, r, s'), N+1 for N-step returns."""
  return int(agent.train_sequence_length)


def shared_variables(agent, train_step: tf.Variable):
  """The nest pushed to the `variables` table: collect policy weights + step."""
  return {
      reverb_variable_container.POLICY_KEY: agent.collect_policy.variables(),
      reverb_variable_container.TRAIN_STEP_KEY: train_step,
  }


def replay_signature(agent, layout: str = 'stock'):
  """Signature of the replay table: collect_data_spec with a time dimension.

  The time dimension is the item length, so a process whose items differ
  (e.g. another --n_step) is refused by the signature check in one line.
  `layout='packed'` (--replay_layout=packed): one float32 tensor per item,
  [item length, packed_width(collect_data_spec)].
  """
  if layout == 'packed':
    return tf.TensorSpec(
        [sequence_length(agent), packed_width(agent.collect_data_spec)],
        tf.float32, name=PACKED_ITEM)
  return tensor_spec.add_outer_dim(
      tensor_spec.from_spec(agent.collect_data_spec), sequence_length(agent))


# The name of a packed table's one tensor.
PACKED_ITEM = 'packed_steps'


def is_packed(signature) -> bool:
  """Whether a replay table's signature is of the packed layout."""
  return (isinstance(signature, tf.TensorSpec) and
          signature.name == PACKED_ITEM)


def packed_width(spec) -> int:
  """float32 words of one step of `spec` in the packed layout.

  A step packs its fields in `tf.nest.flatten` order, each flattened:
  4-byte dtypes bit for bit (one word an element), 8-byte ones bit for bit
  as two words an element, narrower ones (uint8, bool, ...) converted to
  float32, which holds them exactly. `actor.writer` packs, `learner.dataset`
  unpacks.
  """
  return sum(s.shape.num_elements() * (2 if s.dtype.size == 8 else 1)
             for s in tf.nest.flatten(spec))


def variable_signature(variables):
  """Signature of the `variables` table for the nest `variables`."""
  return tf.nest.map_structure(
      lambda v: tf.TensorSpec(v.shape, dtype=v.dtype), variables)


# The agents this project ships.
from common import config as _config  # pylint: disable=g-import-not-at-top,wrong-import-position
from common.agents import dqn as _dqn  # pylint: disable=g-import-not-at-top,wrong-import-position
from common.agents import sac as _sac  # pylint: disable=g-import-not-at-top,wrong-import-position

register(_config.SacConfig, _sac)
register(_config.DqnConfig, _dqn)
