"""Every setting of the system, declared once: its default, its help, who reads it.

A setting is a field of one frozen dataclass below, declared with `setting()`.
From these declarations alone `common.config_flags` defines the absl flags
(every binary accepts every flag, so one `--flagfile` configures a cluster),
shows each binary the flags its role reads in `--help`, checks the presets,
and builds the frozen config each role receives (`LearnerConfig`,
`CollectConfig`, `EvalConfig`, `ReplayServerConfig`, ...). Adding a
hyperparameter is one field here; its flag, help, presets check and place in
every role's config follow.

The role a setting belongs to is the class that declares it: `RunConfig` is
read by every role, `SacConfig`/`DqnConfig`/`EnvOptions` by every role that
builds the agent, the others by their role. SAC defaults are those of the
TF-Agents "SAC Minitaur with the Actor-Learner API" tutorial; DQN defaults
follow the TF-Agents DQN tutorial.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from common.errors import UserError

_SETTING = 'setting'
_DERIVED = 'derived'


@dataclasses.dataclass(frozen=True)
class Setting:
  """How a config field is given on the command line."""
  flag: str  # The flag name (the field name unless another is given).
  help: str
  default: Any  # The flag's default (before `parse`).
  kind: str  # string, integer, float, boolean, enum, list.
  lower: Optional[float] = None
  upper: Optional[float] = None
  choices: Optional[Sequence[str]] = None
  # Flag value -> field value (e.g. '256,256' -> (256, 256)); may raise
  # UserError. `resolve` then sees every setting's value (e.g. 0 -> the
  # --train_steps), by flag name.
  parse: Optional[Callable[[Any], Any]] = None
  resolve: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None
  # Every process of a run must agree on it (`variable_container.contract`).
  contract: bool = False


def setting(default, help, *, flag: Optional[str] = None,  # pylint: disable=redefined-builtin
            kind: Optional[str] = None, flag_default=dataclasses.MISSING,
            lower=None, upper=None, choices=None, parse=None, resolve=None,
            contract: bool = False):
  """A config field that is also a flag.

  Args:
    default: the field's default (and the flag's, unless `flag_default`).
    help: the flag's help.
    flag: the flag's name when it is not the field's (e.g. DQN's
      `learning_rate` is `--dqn_learning_rate`).
    kind: the flag type when the default does not tell it (a None default).
    flag_default: the flag's default when it differs from the library
      default of the field (e.g. the processes validate their environment,
      a test that builds `EnvOptions()` does not).
    lower, upper, choices: bounds and enum values, checked by absl.
    parse: flag value -> field value.
    resolve: (field value, every setting's value by flag) -> final value.
    contract: the setting is part of the run contract.
  """
  if kind is None:
    kind = _kind_of(default if flag_default is dataclasses.MISSING
                    else flag_default, choices)
  meta = dict(flag=flag, help=help,
              default=default if flag_default is dataclasses.MISSING
              else flag_default, kind=kind, lower=lower, upper=upper,
              choices=tuple(choices) if choices else None, parse=parse,
              resolve=resolve, contract=contract)
  return dataclasses.field(default=default, metadata={_SETTING: meta})


def derived(default, compute: Callable[[Mapping[str, Any]], Any],
            reads: Sequence[str] = ()):
  """A config field computed from settings declared elsewhere (no flag).

  `compute` gets every setting's value by flag name; `reads` names the flags
  it reads (shown in the role's --help).
  """
  return dataclasses.field(default=default, metadata={
      _DERIVED: (compute, tuple(reads))})


def _kind_of(default, choices) -> str:
  if choices:
    return 'enum'
  if isinstance(default, bool):
    return 'boolean'
  if isinstance(default, int):
    return 'integer'
  if isinstance(default, float):
    return 'float'
  if isinstance(default, (tuple, list)):
    return 'list'
  return 'string'


def setting_of(field: dataclasses.Field) -> Optional[Setting]:
  meta = field.metadata.get(_SETTING)
  if meta is None:
    return None
  return Setting(**{**meta, 'flag': meta['flag'] or field.name})


def derivation_of(field: dataclasses.Field):
  """(compute, reads) of a `derived` field, or None."""
  return field.metadata.get(_DERIVED)


def _layers(value) -> Tuple[int, ...]:
  """'256,256' (or ['256', '256']) -> (256, 256)."""
  items = value.split(',') if isinstance(value, str) else list(value)
  try:
    layers = tuple(int(x) for x in items)
  except ValueError:
    raise UserError(f'expected comma-separated positive integers, e.g. '
                    f'256,256; got {",".join(str(x) for x in items)}'
                    ) from None
  if any(x <= 0 for x in layers):
    raise UserError('layer sizes must be positive')
  return layers


def _video_size(value) -> Tuple[int, int]:
  try:
    width, height = (int(x) for x in value)
  except ValueError:
    raise UserError(f'expected width,height, e.g. 480,360; got '
                    f'{",".join(value)}') from None
  if width <= 0 or height <= 0:
    raise UserError('width and height must be positive')
  return width, height


def _task(value: str) -> Optional[int]:
  """The actor index, or None for 'auto'."""
  if value == 'auto':
    return None
  if not str(value).isdigit():
    raise UserError(f"expected an index >= 0 or 'auto', got {value!r}")
  return int(value)


def parse_address(address: str, flag_name: str = 'address') -> str:
  """Validates `host:port` and returns it unchanged."""
  host, sep, port = (address or '').rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--{flag_name}={address!r} is not host:port '
                    '(e.g. localhost:8000)')
  return address


def parse_addresses(addresses: str, flag_name: str = 'address') -> tuple:
  """Validates a comma-separated list of distinct `host:port`s."""
  parts = tuple(a.strip() for a in (addresses or '').split(','))
  for part in parts:
    if not part:
      raise UserError(f'--{flag_name}={addresses!r} has an empty entry; '
                      'expected host:port[,host:port...]')
    parse_address(part, flag_name)
  if len(set(parts)) != len(parts):
    raise UserError(f'--{flag_name}={addresses!r} names a server twice')
  return parts


def _addresses(value: str) -> Tuple[str, ...]:
  return parse_addresses(value, 'replay_address')


def _learner_workers(value: str):
  """'' (none, or TF_CONFIG), a count N (the launcher starts N on this
  machine), or every worker's host:port."""
  value = (value or '').strip()
  if not value:
    return ()
  if value.isdigit():
    if int(value) < 1:
      raise UserError(f'--learner_workers={value} must be at least 1')
    return int(value)
  return parse_addresses(value, 'learner_workers')


# --- What is learnt: the agents' hyperparameters.


@dataclasses.dataclass(frozen=True)
class SacConfig:
  """SAC hyperparameters (tutorial defaults)."""
  actor_fc_layers: Tuple[int, ...] = setting(
      (256, 256), 'Actor network hidden layer sizes.', parse=_layers)
  critic_joint_fc_layers: Tuple[int, ...] = setting(
      (256, 256), 'Critic network joint hidden layer sizes.', parse=_layers)
  actor_learning_rate: float = setting(3e-4, 'Adam, actor.', lower=0)
  critic_learning_rate: float = setting(3e-4, 'Adam, critic.', lower=0)
  alpha_learning_rate: float = setting(3e-4, 'Adam, entropy alpha.', lower=0)
  target_update_tau: float = setting(
      0.005, 'Target network soft update.', lower=0, upper=1)
  target_update_period: int = setting(
      1, 'Train steps between target updates.', lower=1)
  gamma: float = setting(0.99, 'Discount.', lower=0, upper=1, contract=True)
  reward_scale_factor: float = setting(1.0, 'Reward scale.', contract=True)
  # None: TF-Agents' default, -dim(A)/2.
  target_entropy: Optional[float] = setting(
      None, "SAC: the policy entropy alpha is tuned to hold (default: "
      "TF-Agents', -dim(A)/2). Below 0, the entropy term makes each step "
      'alive cost reward, which teaches falling on tasks that end when the '
      'robot falls.', kind='float')
  batch_size: int = setting(256, 'Global training batch size.', lower=1)
  gradient_clipping: Optional[float] = setting(
      None, 'SAC: clip the gradients of the actor, critic and alpha to this '
      'norm (default: no clipping, as the tutorial).', kind='float', lower=0)


@dataclasses.dataclass(frozen=True)
class DqnConfig:
  """DQN hyperparameters (TF-Agents DQN tutorial), for discrete actions."""
  q_fc_layers: Tuple[int, ...] = setting(
      (100, 50), 'dqn: Q network hidden layer sizes.', parse=_layers)
  learning_rate: float = setting(1e-3, 'dqn: Adam learning rate.',
                                 flag='dqn_learning_rate', lower=0)
  epsilon_greedy: float = setting(
      0.1, 'dqn: probability of a random action while collecting.', lower=0,
      upper=1)
  # The tutorial updates the target network every step (tau 1, period 1);
  # a slower target is steadier when actors feed the learner asynchronously.
  target_update_tau: float = 1.0
  target_update_period: int = setting(
      100, 'dqn: train steps between target network copies.',
      flag='dqn_target_update_period', lower=1)
  gamma: float = setting(0.99, 'Discount.', lower=0, upper=1, contract=True)
  batch_size: int = setting(64, 'Global training batch size.', lower=1)
  # Double DQN (van Hasselt et al.), as Ape-X. The loss stays the tutorial's
  # squared TD error: the Huber loss (delta 1, Ape-X's) halved CartPole's
  # final return here, 3 seeds each (LEARNING.md, "DQN loss").
  double: bool = setting(
      True, 'dqn: Double DQN (the online network picks the next action, the '
      'target network values it); --nodqn_double: plain DQN.',
      flag='dqn_double')
  loss: str = setting(
      'squared', 'dqn: TD error loss (huber: delta 1, as Ape-X; squared: the '
      'DQN tutorial).', flag='dqn_loss', choices=('squared', 'huber'))
  # N-step returns: replay items of n_step + 1 steps.
  n_step: int = setting(
      1, "dqn: N-step returns; replay items then hold N+1 steps. (SAC: 1 "
      "only; TF-Agents' SAC trains on 2-step transitions.)", lower=1,
      contract=True)
  epsilon_schedule: str = setting(
      'fixed', 'dqn: fixed: every actor explores with --epsilon_greedy; '
      'apex: actor i of --num_actors with --apex_epsilon ** (1 + '
      '--apex_alpha * i / (N-1)), from exploratory to nearly greedy (Ape-X). '
      'The evaluator stays greedy.', choices=('fixed', 'apex'))
  apex_epsilon: float = setting(
      0.4, 'dqn: epsilon of --epsilon_schedule=apex.', lower=0, upper=1)
  apex_alpha: float = setting(
      7.0, 'dqn: alpha of --epsilon_schedule=apex.', lower=0)


AgentConfig = Union[SacConfig, DqnConfig]
# --agent -> its hyperparameters' class.
AGENT_CONFIGS = {'sac': SacConfig, 'dqn': DqnConfig}


@dataclasses.dataclass(frozen=True)
class EnvOptions:
  """Wrappers and checks applied to every environment a process loads."""
  max_episode_steps: int = setting(
      0, "TimeLimit on episodes; 0: the environment's own limit.", lower=0,
      contract=True)
  discretize_actions: int = setting(
      0, 'N > 1: turn bounded continuous actions into N discrete ones per '
      'dimension (ActionDiscretizeWrapper), e.g. for --agent=dqn; 0: off.',
      lower=0, contract=True)
  action_repeat: int = setting(
      1, 'Apply each action for this many environment steps, summing their '
      'rewards (returns stay those of the environment; one train step per '
      'agent step then sees this many environment steps); 1: off.', lower=1,
      contract=True)
  validate_episodes: int = setting(
      0, 'Episodes of random actions with which every process checks the '
      "environment's time steps against its specs at start; 0: skip.",
      flag='validate_env_episodes', flag_default=1, lower=0)


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  """Replay table settings (tutorial defaults).

  `samples_per_insert` is the number of sampled items per inserted item. With
  batches of 256 the default 256 means one train step per environment step,
  the ratio of the tutorial's single-process loop. `None` in a built config:
  a plain `MinSize` limiter (`--rate_limiter=min_size`), the learner samples
  as fast as it can.
  """
  replay_capacity: int = setting(
      10000, 'Items (2-step transitions) the replay table holds.', lower=1)
  min_size_to_sample: int = setting(
      10000, 'Items in the table before the learner may sample.', lower=1)
  samples_per_insert: Optional[float] = setting(
      256.0, 'Sampled items per inserted item (SampleToInsertRatio). '
      'Default: the batch size, i.e. one train step per env step, as in the '
      'tutorial.', kind='float', flag_default=None, lower=0,
      resolve=lambda value, v: (
          None if v['rate_limiter'] == 'min_size' else
          float(v['batch_size'] if value is None else value)))
  # Slack of the SampleToInsertRatio limiter, as a fraction of
  # `min_size_to_sample * samples_per_insert` (TF-Agents' distributed examples
  # use 0.1).
  samples_per_insert_tolerance: float = 0.1
  # Prioritized replay (Schaul et al.): items sampled with probability
  # priority ** priority_exponent; the learner writes |TD error| priorities.
  prioritized: bool = setting(
      False, "uniform: the tutorial's uniform sampling. prioritized: items "
      'sampled in proportion to priority ** --priority_exponent; the learner '
      "writes each sampled item's |TD error| back as its priority and "
      'corrects with importance-sampling weights; new items enter at the '
      'largest recent priority. The table keeps the name uniform_table.',
      flag='replay', flag_default='uniform',
      choices=('uniform', 'prioritized'),
      parse=lambda value: value == 'prioritized', contract=True)
  priority_exponent: float = setting(
      0.6, '--replay=prioritized: alpha; 0 samples uniformly.', lower=0)
  rate_limiter: str = setting(
      'ratio', 'ratio: SampleToInsertRatio(--samples_per_insert); min_size: '
      'MinSize, the learner samples as fast as it can.',
      choices=('ratio', 'min_size'))
  replay_layout: str = setting(
      'stock', "stock: items in TF-Agents' Trajectory columns (one per field, "
      'each in its own chunks), as ReverbReplayBuffer, as_dataset and the '
      "tutorial read them. packed: each item one flat float32 tensor "
      '[item steps, fields] in one chunk, which the learner unpacks; about '
      '4x the items a sampling core receives (BENCHMARKS.md), but stock '
      'TF-Agents clients cannot read the table.',
      choices=('stock', 'packed'), contract=True)


# --- Where it runs: the roles.


def _contract(values: Mapping[str, Any]) -> dict:
  return {name: values[name] for name in contract_flags()}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What every process of a run reads."""
  env_name: str = setting(
      'MinitaurBulletEnv-v0',
      'Environment: a gym or PyBullet id, or package.module:factory.',
      flag='env', contract=True)
  agent_name: str = setting(
      'sac', 'sac for continuous actions, dqn for discrete ones.',
      flag='agent', choices=('sac', 'dqn'), contract=True)
  preset: str = setting(
      'auto', 'Hyperparameter preset: a flagfile presets/<name>.cfg '
      '(minitaur, tutorial) whose values apply to every flag not given on '
      'the command line or in a --flagfile. auto: minitaur for '
      "--env=MinitaurBulletEnv-v0, none otherwise; none: the flag defaults "
      "(the tutorial's).")
  seed: int = setting(
      0, 'Run seed: network initialization, action sampling and environment '
      'seeds of every process derive from it.', lower=0)
  root_dir: str = setting(
      'runs/sac', "This process's output directory (checkpoints, summaries, "
      'videos); never read by another process.')
  # Every replay shard, in --replay_address order; () with `replay_address`
  # alone (a config built in code for one server).
  replay_shards: Tuple[str, ...] = setting(
      (), 'host:port of the replay server, or a comma-separated list of '
      'shards (each a replay_server): actor i writes to shard i mod S, the '
      'learner samples from all of them. Every shard also serves the '
      'variables (unless --variable_address), its max priority and its '
      'share of the --task=auto indices, so the run survives the loss of any '
      'one shard.', flag='replay_address', kind='string',
      flag_default='localhost:8000', parse=_addresses)
  # The first shard: actor indices, max priority, default variables.
  replay_address: str = derived(
      '', lambda v: _addresses(v['replay_address'])[0],
      reads=('replay_address',))
  variable_address: str = setting(
      '', 'host:port of the variable container; empty: the replay server.',
      resolve=lambda value, v: (parse_address(value, 'variable_address')
                                if value else
                                _addresses(v['replay_address'])[0]))
  # No --variable_address: every replay shard serves the variables (the
  # learner pushes to all of them, each actor reads its own).
  variables_on_shards: bool = derived(
      False, lambda v: not v['variable_address'], reads=('variable_address',))
  server_timeout_s: float = setting(
      300.0, 'Seconds a client waits for a server before giving up.', lower=0)
  log_interval_s: float = setting(
      10.0, 'Seconds between progress log lines.', lower=0.1)
  train_steps: int = setting(100000, 'Learner train steps.', lower=1)
  # The agent --agent names, and the wrappers of every environment.
  agent: AgentConfig = SacConfig()
  env_options: EnvOptions = EnvOptions()
  # The flags every process of the run must share, checked against each
  # server's at connect (`variable_container.contract`); None: not checked.
  contract: Optional[Mapping] = derived(None, _contract)
  # The replay items' layout (--replay_layout, a ReplayConfig setting).
  replay_layout: str = derived('stock', lambda v: v['replay_layout'],
                               reads=('replay_layout',))

  @property
  def shards(self) -> Tuple[str, ...]:
    return self.replay_shards or (self.replay_address,)


@dataclasses.dataclass(frozen=True)
class LearnerConfig(RunConfig):
  """python -m learner."""
  strategy: str = setting(
      'default', 'learner: tf.distribute strategy. mirrored uses every GPU, '
      'or every logical CPU device when there is no GPU; multi_worker '
      'trains one model synchronously over the learner processes of '
      '--learner_workers (or TF_CONFIG), on one machine or many.',
      choices=('default', 'mirrored', 'tpu', 'multi_worker'))
  learner_workers: Union[int, Tuple[str, ...]] = setting(
      (), '--strategy=multi_worker: every learner worker\'s host:port (the '
      'same list in the same order on every worker; the first is the chief, '
      'which alone pushes weights and writes under --root_dir). Empty: from '
      'the TF_CONFIG environment variable. launcher: a number N starts N '
      'workers on this machine.', kind='string', flag_default='',
      parse=_learner_workers)
  learner_index: int = setting(
      0, '--strategy=multi_worker: this worker\'s index in '
      '--learner_workers (0: the chief).', lower=0)
  worker_timeout_s: float = setting(
      30.0, '--strategy=multi_worker: a learner worker not heard from for '
      'this long (TensorFlow\'s coordination heartbeat: its process died or '
      'hangs) is gone: the collectives waiting for it fail and every worker '
      'ends with one line.', lower=1)
  tpu_address: str = setting(
      '', 'learner: TPU name or address for --strategy=tpu.')
  logical_cpu_devices: int = setting(
      0, 'learner: split the CPU into this many logical devices (0: leave as '
      'is); lets --strategy=mirrored run on a CPU-only machine.', lower=0)
  push_interval_steps: int = setting(
      100, 'learner: train steps between pushes of the policy weights.',
      lower=1)
  iterations_per_call: int = setting(
      10, 'learner: train steps run inside one tf.function call.', lower=1)
  checkpoint_interval_steps: int = setting(
      10000, 'learner: train steps between checkpoints.', lower=1)
  policy_save_interval: int = setting(
      5000, 'Train steps between policy SavedModels.', lower=1)
  summary_interval: int = 100
  # Prefetched batches: the sampler keeps this many ready ahead of training.
  prefetch_batches: int = 8
  sample_parallel_readers: int = setting(
      2, 'learner: parallel Reverb readers feeding the training batches.',
      lower=1)
  # A sample waits at most this long for the rate limiter; then the loop
  # regains control (to log why it waits, or to stop) and samples again.
  sample_timeout_ms: int = 1000
  alive_bonus: float = setting(
      0.0, 'learner: added to the reward of each sampled transition after '
      'which the episode goes on (discount > 0), before '
      '--reward_scale_factor. A survival bonus in the training objective '
      'only: the replay table, the actors and the evaluator keep the '
      "environment's own rewards. 0: off.")
  # The table is prioritized (--replay): train with importance-sampling
  # weights and write |TD error| priorities back.
  prioritized: bool = derived(False, lambda v: v['replay'] == 'prioritized',
                              reads=('replay',))
  importance_sampling_exponent: float = setting(
      0.4, '--replay=prioritized: beta of the importance-sampling weights at '
      'the first train step, annealed linearly to 1 at --train_steps.',
      lower=0, upper=1)


@dataclasses.dataclass(frozen=True)
class _ActingConfig(RunConfig):
  """What the collecting actors and the evaluator both read."""
  mode: str = setting(
      'collect', 'actor: collect experience, or evaluate the greedy policy.',
      choices=('collect', 'eval'))
  max_train_steps: int = setting(
      0, "actor: exit once the learner's train_step reaches this; 0: "
      '--train_steps.', lower=0,
      resolve=lambda value, v: value or v['train_steps'])
  env_step_timeout_s: float = setting(
      60.0, 'actor: an environment step or reset that takes longer than '
      'this ends the actor with one line and exit code 2 (a hung '
      'environment).', lower=0.1)
  stop_timeout_s: float = setting(
      30.0, 'actor: an actor stuck this long after SIGTERM/SIGINT (its '
      'main thread in one call, using no CPU) exits at once (code 1) with '
      'one line; one still running Python gets 4 times this in all.',
      lower=0.1)


@dataclasses.dataclass(frozen=True)
class CollectConfig(_ActingConfig):
  """python -m actor --mode=collect."""
  task: Optional[int] = setting(
      0, "actor: index of this actor, or 'auto' to take the next free index "
      'from the replay server (replicas from one template, e.g. '
      'docker-compose --scale actor=4).', kind='string', flag_default='0',
      parse=_task)
  num_actors: int = setting(1, 'Collecting actors in the cluster.', lower=1)
  initial_collect_steps: int = setting(
      10000, 'Random-policy env steps before collecting with the policy, '
      'split over the actors.', lower=0)
  pull_interval_steps: int = setting(
      100, 'actor: env steps between pulls of the policy weights.', lower=1)
  envs_per_actor: int = setting(
      1, 'actor: environments one actor steps together (one batched policy '
      'call per step of all of them); with --env_processes=K, in each of the '
      'K subprocesses.', lower=1)
  env_processes: int = setting(
      1, 'actor: environments stepped in this many subprocesses, one each, '
      'behind one batched policy call (1: in the actor process). Lets one '
      'actor fill several cores.', lower=1)
  # While blocked by the rate limiter, how often to ask whether training ended.
  done_check_interval_s: float = 5.0


@dataclasses.dataclass(frozen=True)
class EvalConfig(_ActingConfig):
  """python -m actor --mode=eval: the evaluator."""
  eval_interval: int = setting(
      10000, 'Train steps between evaluations.', lower=1)
  num_eval_episodes: int = setting(20, 'Episodes per evaluation.', lower=1)
  final_eval_episodes: int = setting(
      0, 'Episodes of the evaluation at the final train step, the one a run '
      'is judged on (0: --num_eval_episodes). More than --num_eval_episodes '
      'keeps the evaluations during the run cheap and the final one exact.',
      lower=0)
  poll_interval_s: float = 1.0
  video_episodes: int = setting(
      1, 'evaluator: greedy episodes rendered into each mp4 (0: no video).',
      lower=0)
  video_interval: int = setting(
      0, 'evaluator: also write a video every this many train steps (0: only '
      'at the end of training).', lower=0)
  video_size: Tuple[int, int] = setting(
      (480, 360), 'evaluator: width,height of Minitaur video frames (its '
      'software renderer takes time in proportion to pixels; the environment '
      'default is 960,720).', parse=_video_size)


@dataclasses.dataclass(frozen=True)
class _ServingConfig(RunConfig):
  """What both servers read."""
  port: int = setting(
      8000, 'replay_server / variable_container: port to serve on.', lower=1,
      upper=65535)
  checkpoint_dir: str = setting(
      '', 'replay_server: directory for Reverb checkpoints of every table '
      '(replay, variables, actor indices); restored at start. Empty: no '
      'persistence.')
  checkpoint_interval_s: float = setting(
      600.0, 'replay_server: seconds between table checkpoints (one is also '
      'written on SIGTERM).', lower=1)


@dataclasses.dataclass(frozen=True)
class VariableContainerConfig(_ServingConfig):
  """python -m variable_container."""


@dataclasses.dataclass(frozen=True)
class ReplayServerConfig(_ServingConfig):
  """python -m replay_server."""
  tables: str = setting(
      'replay_and_variables', 'replay_server: tables to serve; "replay" when '
      'the variables live on a separate `python -m variable_container`.',
      choices=('replay_and_variables', 'replay'))
  replay_shard: int = setting(
      -1, 'replay_server: the position of this server in --replay_address '
      '(its shard index; it hands out the --task=auto indices i with i mod S '
      'equal to it). -1: found from --port in --replay_address (0 with one '
      'shard).', lower=-1)
  actor_lease_timeout_s: float = setting(
      30.0, 'replay_server: a --task=auto index whose actor has not renewed '
      'it for this long (the actor is gone) is handed out again.', lower=1)
  actor_lease_grace_s: float = setting(
      8.0, 'replay_server: seconds after start before it hands out '
      '--task=auto actor indices, while live actors (which renew theirs '
      'every 2s) tell it which they hold; so a restart never hands out an '
      'index twice.', lower=0)
  replay: ReplayConfig = ReplayConfig()


@dataclasses.dataclass(frozen=True)
class LauncherConfig(ReplayServerConfig, LearnerConfig, CollectConfig,
                     EvalConfig):
  """python -m launcher: starts every role, passing every flag on."""
  with_evaluator: bool = setting(
      True, 'launcher: also start an evaluator.')
  restart_actors: bool = setting(
      True, 'launcher: restart an actor that dies.')
  max_actor_restarts: int = setting(
      5, 'launcher: consecutive failures after which a dead actor is not '
      'restarted (the count resets once it has run --healthy_after_s).',
      lower=0)
  restart_backoff_s: float = setting(
      2.0, 'launcher: delay before restarting a dead actor, doubled with '
      'every consecutive failure (at most 60s).', lower=0)
  healthy_after_s: float = setting(
      60.0, 'launcher: an actor that has run this long counts as healthy: '
      'its consecutive-failure count starts again from 0.', lower=0)
  show_child_logs: bool = setting(
      True, "launcher: echo every child's log lines, prefixed with its role "
      '(they are always written to <root_dir>/logs/<role>.log).')
  progress_interval_s: float = setting(
      10.0, 'launcher: seconds between progress lines.', lower=0.1)
  num_replay_shards: int = setting(
      1, 'launcher: replay servers to start (shards); actor i writes to '
      'shard i mod S and the learner samples from all of them.',
      flag='replay_shards', lower=1)


# The configs whose settings become flags (nested ones are reached from
# these), and the role configs each binary builds.
ROLE_CONFIGS = {
    'learner': (LearnerConfig,),
    'actor': (CollectConfig, EvalConfig),
    'replay_server': (ReplayServerConfig,),
    'variable_container': (VariableContainerConfig,),
    'launcher': (LauncherConfig,),
}


def nested_configs(cls) -> Tuple[type, ...]:
  """The config classes whose settings `cls` holds, `cls` first."""
  found = [cls]
  for field in dataclasses.fields(cls):
    if field.name == 'agent':
      found += AGENT_CONFIGS.values()
    elif dataclasses.is_dataclass(field.type):
      found += nested_configs(field.type)
  return tuple(dict.fromkeys(found))


def settings(cls) -> Tuple[Tuple[dataclasses.Field, Setting], ...]:
  """(field, setting) of every setting `cls` declares itself (not nested)."""
  return tuple((f, s) for f in dataclasses.fields(cls)
               for s in [setting_of(f)] if s is not None)


def all_settings():
  """{flag: [(config class, field, setting), ...]} over every config."""
  found = {}
  for cls in nested_configs(LauncherConfig):
    for field, s in settings(cls):
      found.setdefault(s.flag, []).append((cls, field, s))
  return found


def contract_flags() -> Tuple[str, ...]:
  """The settings every process of one run must share, by flag name."""
  return tuple(flag for flag, declared in all_settings().items()
               if any(s.contract for _, _, s in declared))


def flag_name(cls, field_name: str) -> str:
  """The flag of `cls`'s field `field_name` (e.g. DqnConfig.learning_rate ->
  dqn_learning_rate)."""
  s = setting_of(next(f for f in dataclasses.fields(cls)
                      if f.name == field_name))
  return s.flag if s else field_name


def check_replay(replay: ReplayConfig, batch_size: int) -> ReplayConfig:
  """`replay` if the learner can sample from such a table, else UserError."""
  if replay.min_size_to_sample > replay.replay_capacity:
    raise UserError(
        f'--min_size_to_sample={replay.min_size_to_sample} is larger than '
        f'--replay_capacity={replay.replay_capacity}: the learner could never '
        'sample; lower it or raise the capacity')
  if replay.rate_limiter == 'ratio' and not replay.samples_per_insert:
    raise UserError('--samples_per_insert must be > 0 with '
                    '--rate_limiter=ratio (or use --rate_limiter=min_size)')
  if (replay.rate_limiter == 'ratio' and
      replay.min_size_to_sample < batch_size):
    raise UserError(
        f'--samples_per_insert needs --min_size_to_sample '
        f'({replay.min_size_to_sample}) >= --batch_size ({batch_size}): '
        'the ratio is kept from the first batch on, so that batch must come '
        'from at least a batch of items; raise --min_size_to_sample')
  return replay
