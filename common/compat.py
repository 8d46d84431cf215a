"""Every touch of a private attribute of TF-Agents or Reverb, and only here.

Written against tf-agents 0.19.0 and dm-reverb 0.14.0 (the versions
`requirements.txt` pins). Two fast paths need what those libraries keep
private:

- the actors' NumPy collect policies (`common/agents/sac.py`, `dqn.py`) read
  the layers inside the agents' networks, which TF-Agents does not expose;
- the actors' trajectory writer (`actor/writer.py`) appends steps and creates
  items through Reverb's C++ writer, skipping the per-step Python and
  `tf.nest` work of `reverb.TrajectoryWriter` (more than the C++ append, item
  and flush together);
- PyBullet environments (`common/environments.py`) get their client's
  functions bound once (`bind_bullet_client`), instead of one
  `BulletClient.__getattr__` per call (Minitaur makes ~800 an agent step).

The tests also read the agents' networks, optimizers, entropy coefficient and
collect epsilon through the small accessors below.

Each function says what it reads and what breaks if that changes. The parity
tests in `tests/test_compat.py` compare both paths with the libraries' own
(the NumPy policies with TF-Agents' policies on the same weights, the writer's
items with those of TF-Agents' `ReverbAddTrajectoryObserver`): after an
upgrade, run them first. No other module touches a private attribute of
TF-Agents or Reverb.
"""

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import tensorflow as tf
from tf_agents.agents.sac import tanh_normal_projection_network
from tf_agents.networks import actor_distribution_network
from tf_agents.networks import encoding_network
from tf_agents.networks import q_network
import tree

# pylint: disable=protected-access


def sac_actor_network(agent) -> Any:
  """A `SacAgent`'s actor network (`SacAgent._actor_network`).

  tf-agents 0.19.0: set in `SacAgent.__init__`, no public accessor. If it is
  renamed, this raises AttributeError: the NumPy SAC policy and the parity
  tests fail at once rather than acting with other weights.
  """
  return agent._actor_network


def dqn_q_network(agent) -> Any:
  """A `DqnAgent`'s online Q network (`DqnAgent._q_network`).

  tf-agents 0.19.0: set in `DqnAgent.__init__`, no public accessor. If it is
  renamed, this raises AttributeError (the NumPy DQN policy and the parity
  tests fail at once).
  """
  return agent._q_network


def sac_networks(agent) -> Dict[str, Any]:
  """A `SacAgent`'s networks: {'actor', 'critic_1', 'critic_2',
  'target_critic_1', 'target_critic_2'}.

  tf-agents 0.19.0: `SacAgent._actor_network`, `._critic_network_1`,
  `._critic_network_2`, `._target_critic_network_1` and
  `._target_critic_network_2`, set in `SacAgent.__init__`, no public
  accessor. If one is renamed, this raises AttributeError.
  """
  return {'actor': sac_actor_network(agent),
          'critic_1': agent._critic_network_1,
          'critic_2': agent._critic_network_2,
          'target_critic_1': agent._target_critic_network_1,
          'target_critic_2': agent._target_critic_network_2}


def sac_optimizers(agent) -> Dict[str, Any]:
  """A `SacAgent`'s optimizers: {'actor', 'critic', 'alpha'}.

  tf-agents 0.19.0: `SacAgent._actor_optimizer`, `._critic_optimizer` and
  `._alpha_optimizer` (each converted to a legacy Keras optimizer), set in
  `SacAgent.__init__`, no public accessor. If one is renamed, this raises
  AttributeError.
  """
  return {'actor': agent._actor_optimizer,
          'critic': agent._critic_optimizer,
          'alpha': agent._alpha_optimizer}


def sac_log_alpha(agent) -> tf.Variable:
  """A `SacAgent`'s log entropy coefficient (`SacAgent._log_alpha`).

  tf-agents 0.19.0: the variable created in `SacAgent.__init__` from
  `initial_log_alpha`, no public accessor. If it is renamed, this raises
  AttributeError.
  """
  return agent._log_alpha


def dqn_networks(agent) -> Dict[str, Any]:
  """A `DqnAgent`'s networks: {'q', 'target_q'}.

  tf-agents 0.19.0: `DqnAgent._q_network` and `._target_q_network`, set in
  `DqnAgent.__init__`, no public accessor. If one is renamed, this raises
  AttributeError.
  """
  return {'q': dqn_q_network(agent), 'target_q': agent._target_q_network}


def epsilon(policy) -> float:
  """The exploration rate of an `EpsilonGreedyPolicy` (its `_get_epsilon()`).

  tf-agents 0.19.0: `EpsilonGreedyPolicy._get_epsilon` returns `epsilon`, or
  calls it when it is callable; no public accessor. If it is renamed, this
  raises AttributeError.
  """
  return policy._get_epsilon()


class ActorNetworkLayers(NamedTuple):
  """What a NumPy policy needs of an `ActorDistributionNetwork` with a
  `TanhNormalProjectionNetwork`: the encoder, the dense layer that projects to
  [means, log stds], and the transform from its second half to stds."""
  encoder: Any
  projection_layer: tf.keras.layers.Layer
  std_transform: Callable


def actor_network_layers(agent) -> Optional[ActorNetworkLayers]:
  """The layers of a `SacAgent`'s actor network, or None for other networks.

  None unless the network is an `ActorDistributionNetwork` whose one
  projection is a `TanhNormalProjectionNetwork`. Reads (tf-agents 0.19.0)
  `ActorDistributionNetwork._encoder` and `._projection_networks`, and
  `TanhNormalProjectionNetwork._projection_layer` and `._std_transform`. If
  the projection network changes its math (not a dense layer to [means, log
  stds] in this order), the NumPy policy would act differently from the TF
  one: `tests/test_compat.py` compares them on random weights.
  """
  net = sac_actor_network(agent)
  if not isinstance(net, actor_distribution_network.ActorDistributionNetwork):
    return None
  projections = tf.nest.flatten(net._projection_networks)
  if len(projections) != 1 or not isinstance(
      projections[0],
      tanh_normal_projection_network.TanhNormalProjectionNetwork):
    return None
  projection = projections[0]
  return ActorNetworkLayers(net._encoder, projection._projection_layer,
                            projection._std_transform)


class QNetworkLayers(NamedTuple):
  """What a NumPy policy needs of a `QNetwork`: its encoder and the dense
  layer from the encoding to one Q value per action."""
  encoder: Any
  q_value_layer: tf.keras.layers.Layer


def q_network_layers(agent) -> Optional[QNetworkLayers]:
  """The layers of a `DqnAgent`'s Q network, or None when it is no `QNetwork`.

  Reads (tf-agents 0.19.0) `QNetwork._encoder` and `._q_value_layer`; the
  Q values are `q_value_layer(encoder(observation))`. If that changes, the
  NumPy DQN policy's Q values differ from TF's: `tests/test_compat.py`
  compares them.
  """
  net = dqn_q_network(agent)
  if not isinstance(net, q_network.QNetwork):
    return None
  return QNetworkLayers(net._encoder, net._q_value_layer)


def encoder_postprocessing_layers(
    encoder) -> Optional[Sequence[tf.keras.layers.Layer]]:
  """An `EncodingNetwork`'s layers when they are all it applies, else None.

  None for other encoders and for one with preprocessing layers or a
  preprocessing combiner. Reads (tf-agents 0.19.0)
  `EncodingNetwork._flat_preprocessing_layers`, `._preprocessing_combiner`
  and `._postprocessing_layers` (the Flatten / Conv / Dense stack applied in
  order). If another step is added between them, the NumPy policies would
  skip it: `tests/test_compat.py` compares them with TF's.
  """
  if (not isinstance(encoder, encoding_network.EncodingNetwork) or
      encoder._flat_preprocessing_layers is not None or
      encoder._preprocessing_combiner is not None):
    return None
  return encoder._postprocessing_layers


class _OrderedIdentitySet:
  """`object_identity.ObjectIdentitySet` that iterates in insertion order."""

  def __init__(self, items=()):
    self._items = {}
    for item in items:
      self._items.setdefault(id(item), item)

  def __iter__(self):
    return iter(list(self._items.values()))

  def __len__(self):
    return len(self._items)

  def __contains__(self, item):
    return id(item) in self._items


class _OrderedObjectIdentity:
  """`tensorflow.python.util.object_identity` with `_OrderedIdentitySet`."""

  def __init__(self, module):
    self._module = module
    self.ObjectIdentitySet = _OrderedIdentitySet  # pylint: disable=invalid-name

  def __getattr__(self, name):
    return getattr(self._module, name)


def order_sac_critic_variables() -> None:
  """Makes `SacAgent.train` take its critic variables in a fixed order.

  tf-agents 0.19.0 `SacAgent._train` lists the critic variables as
  `list(object_identity.ObjectIdentitySet(...))`, an order of their `id()`s
  that differs from process to process. One process does not mind (Adam
  updates each variable alone); workers of a MultiWorkerMirroredStrategy
  do: their collectives (the slot variables' initial broadcasts, the
  gradient all-reduces) must come in the same order on every worker, or
  they fail ('Shape mismatch in the collective instance'). This gives
  `sac_agent`'s module reference an identity set that keeps the order the
  variables were given in (the networks' own). The math is unchanged.
  """
  # pylint: disable=g-import-not-at-top
  from tf_agents.agents.sac import sac_agent
  # pylint: enable=g-import-not-at-top
  if not isinstance(sac_agent.object_identity, _OrderedObjectIdentity):
    sac_agent.object_identity = _OrderedObjectIdentity(
        sac_agent.object_identity)


def configure_worker_coordination(register_timeout_s: float,
                                  heartbeat_timeout_s: float) -> None:
  """TensorFlow's coordination service for a multi-worker learner, with
  timeouts: how long workers wait for each other to start, and after how
  long without a heartbeat a worker counts as gone (its peers' collectives
  then fail instead of waiting).

  `tf.distribute.MultiWorkerMirroredStrategy` configures the service itself
  (with no start-up limit: a worker whose peer never starts waits forever)
  unless one is configured already; it has no public setting for either
  timeout. Reads `tensorflow.python.eager.context` (TensorFlow 2.15); call
  before creating the strategy and before any op.
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.eager import context
  from tensorflow.tsl.protobuf import coordination_config_pb2
  # pylint: enable=g-import-not-at-top
  cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  spec = cluster.cluster_spec()
  context.context().configure_coordination_service(
      service_type='standalone',
      service_leader='/job:worker/replica:0/task:0',
      cluster_register_timeout_in_ms=int(register_timeout_s * 1000),
      heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000),
      coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
          name='worker', num_tasks=spec.num_tasks('worker'))])


def checkpointed_variables(agent, train_step: tf.Variable) -> List[tf.Variable]:
  """Every variable a Learner's checkpoint of `agent` holds: the networks',
  the optimizers' slots and step counts (which `agent.variables` leaves out)
  and `train_step`. Reads `tensorflow.python.checkpoint.checkpoint`'s object
  graph walk (TensorFlow 2.15), which has no public counterpart.
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.checkpoint import checkpoint as checkpoint_lib
  # pylint: enable=g-import-not-at-top
  root = tf.train.Checkpoint(agent=agent, train_step=train_step)
  found = {}
  for obj in checkpoint_lib.list_objects(root):
    if isinstance(obj, tf.Variable):
      found.setdefault(id(obj), obj)
  return list(found.values())


class DirectTrajectoryWriter:
  """Appends steps and creates items through a `reverb.TrajectoryWriter`'s
  C++ writer, keeping its Python history in step.

  `reverb.TrajectoryWriter.append` flattens and reorders each step by path and
  `create_item` maps `tf.nest` over the history per item; for a fixed
  structure written step after step, both reduce to the C++ calls used here.
  The first step goes through the Python writer, which lays out the columns
  (checked to be in `tree.flatten` order); later steps go to the C++ writer,
  and their references are appended to the Python writer's column histories
  too, so its `history`, `flush` and `end_episode` behave as if it had
  appended them itself.

  Reads (dm-reverb 0.14.0) `TrajectoryWriter._writer` (the pybind
  `TrajectoryWriter`, its `Append(list)` and `CreateItem(table, priority,
  columns, squeeze)`), `._path_to_column_index`, `._column_history` and
  `_ColumnHistory._data_references`. If they change, the first `append`
  raises (AttributeError, or ValueError for another column order) or the
  items differ from TF-Agents' observer's: `tests/test_compat.py` and
  `tests/test_writer.py` check them.
  """

  def __init__(self, writer, squeeze: bool = False):
    self._writer = writer  # reverb.TrajectoryWriter
    self._cpp_writer = writer._writer
    self._columns = None  # The Python writer's column histories, once known.
    self._squeeze = None
    self._squeeze_all = squeeze

  def append(self, trajectory) -> List[Any]:
    """Appends one step (the same structure every time); returns its column
    references in `tree.flatten` order."""
    if self._columns is not None:
      refs = self._cpp_writer.Append(tree.flatten(trajectory))
      for column, ref in zip(self._columns, refs):
        column.append(ref)
      return refs
    writer = self._writer
    writer.append(trajectory)
    paths = [path for path, _ in tree.flatten_with_path(trajectory)]
    if [writer._path_to_column_index.get(p) for p in paths] != list(
        range(len(paths))):
      raise ValueError(f'unexpected Reverb column order for {paths}')
    self._columns = writer._column_history
    self._squeeze = [self._squeeze_all] * len(self._columns)
    return [column._data_references[-1] for column in self._columns]

  def create_item(self, table: str, priority: float,
                  columns: List[List[Any]]) -> None:
    """An item of every column, `columns[c]` the references of column c.

    Each column keeps its time dimension; with `squeeze`, each column is one
    reference whose step becomes the item's tensor (the packed layout, whose
    one step is the whole item).
    """
    self._cpp_writer.CreateItem(table, priority, columns, self._squeeze)


class BoundBulletClient:
  """A `pybullet_utils.bullet_client.BulletClient` whose functions are looked
  up once.

  `BulletClient.__getattr__` runs on every call (`inspect.isbuiltin` and a
  new `functools.partial` binding `physicsClientId`): about 10 % of a
  Minitaur step. Here the first lookup of a public name is kept as an
  attribute, so later ones skip `__getattr__`; the calls and their results
  are the same (`tests/test_environments.py` compares episodes bit for bit).
  `disconnect` and private names (the client id, which `disconnect` changes)
  are looked up every time.
  """

  def __init__(self, client):
    self.bullet_client = client

  def __getattr__(self, name):
    value = getattr(self.bullet_client, name)
    if not name.startswith('_') and name != 'disconnect':
      setattr(self, name, value)
    return value


def bind_bullet_client(gym_env) -> bool:
  """Gives `gym_env` (unwrapped) and its robot a `BoundBulletClient`; True
  if it has a PyBullet client to bind.

  pybullet_envs 3.2.7: `MinitaurBulletEnv` and its relatives keep their
  `BulletClient` in `_pybullet_client`, and hand it to the `Minitaur` they
  build on every hard reset (`minitaur._pybullet_client`, set in
  `Minitaur.__init__`). If either attribute is renamed, nothing is bound
  and the environment runs as it comes (this returns False).
  """
  from pybullet_utils import bullet_client  # pylint: disable=g-import-not-at-top
  client = getattr(gym_env, '_pybullet_client', None)
  if not isinstance(client, bullet_client.BulletClient):
    return False
  bound = BoundBulletClient(client)
  gym_env._pybullet_client = bound
  robot = getattr(gym_env, 'minitaur', None)
  if getattr(robot, '_pybullet_client', None) is client:
    robot._pybullet_client = bound
  return True


def bullet_client_is_bound(gym_env) -> bool:
  """Whether `gym_env` (unwrapped) steps through a `BoundBulletClient`."""
  return isinstance(getattr(gym_env, '_pybullet_client', None),
                    BoundBulletClient)
