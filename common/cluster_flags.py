"""Flags shared by every process, so one `--flagfile` configures a whole cluster.

Every binary defines all of these, so the same flagfile can be passed to the
replay server, the learner, every actor and the evaluator; each reads the ones
it needs. Defaults are the TF-Agents SAC Minitaur tutorial's.
"""

from absl import flags

from common import config as config_lib
from common.errors import UserError

_SAC = config_lib.SacConfig()
_DQN = config_lib.DqnConfig()
_REPLAY = config_lib.ReplayConfig()

# --- What to train.
ENV = flags.DEFINE_string(
    'env', 'MinitaurBulletEnv-v0',
    'Environment: a gym or PyBullet id, or package.module:factory.')
AGENT = flags.DEFINE_enum(
    'agent', 'sac', ['sac', 'dqn'],
    'sac for continuous actions, dqn for discrete ones.')
MAX_EPISODE_STEPS = flags.DEFINE_integer(
    'max_episode_steps', 0,
    "TimeLimit on episodes; 0: the environment's own limit.", lower_bound=0)
DISCRETIZE_ACTIONS = flags.DEFINE_integer(
    'discretize_actions', 0,
    'N > 1: turn bounded continuous actions into N discrete ones per '
    'dimension (ActionDiscretizeWrapper), e.g. for --agent=dqn; 0: off.',
    lower_bound=0)
ACTION_REPEAT = flags.DEFINE_integer(
    'action_repeat', 1,
    'Apply each action for this many environment steps, summing their rewards '
    '(returns stay those of the environment; one train step per agent step '
    'then sees this many environment steps); 1: off.', lower_bound=1)
VALIDATE_ENV_EPISODES = flags.DEFINE_integer(
    'validate_env_episodes', 1,
    'Episodes of random actions with which every process checks the '
    "environment's time steps against its specs at start; 0: skip.",
    lower_bound=0)
PRESET = flags.DEFINE_string(
    'preset', 'auto',
    'Hyperparameter preset: a flagfile presets/<name>.cfg (minitaur, '
    'tutorial) whose values apply to every flag not given on the command line '
    'or in a --flagfile. auto: minitaur for --env=MinitaurBulletEnv-v0, none '
    'otherwise; none: the flag defaults (the tutorial\'s).')
SEED = flags.DEFINE_integer(
    'seed', 0,
    'Run seed: network initialization, action sampling and environment '
    'seeds of every process derive from it.', lower_bound=0)
ROOT_DIR = flags.DEFINE_string(
    'root_dir', 'runs/sac',
    "This process's output directory (checkpoints, summaries, videos); never "
    'read by another process.')

# --- Where the servers are.
PORT = flags.DEFINE_integer(
    'port', 8000, 'replay_server / variable_container: port to serve on.',
    lower_bound=1, upper_bound=65535)
REPLAY_ADDRESS = flags.DEFINE_string(
    'replay_address', 'localhost:8000',
    'host:port of the replay server, or a comma-separated list of shards '
    '(each a replay_server): actor i writes to shard i mod S, the learner '
    'samples from all of them. Every shard also serves the variables (unless '
    '--variable_address), its max priority and its share of the --task=auto '
    'indices, so the run survives the loss of any one shard.')
VARIABLE_ADDRESS = flags.DEFINE_string(
    'variable_address', '',
    'host:port of the variable container; empty: the replay server.')
SERVER_TIMEOUT_S = flags.DEFINE_float(
    'server_timeout_s', 300,
    'Seconds a client waits for a server before giving up.', lower_bound=0)

# --- Agent hyperparameters.
ACTOR_FC_LAYERS = flags.DEFINE_list(
    'actor_fc_layers', [str(x) for x in _SAC.actor_fc_layers],
    'Actor network hidden layer sizes.')
CRITIC_JOINT_FC_LAYERS = flags.DEFINE_list(
    'critic_joint_fc_layers', [str(x) for x in _SAC.critic_joint_fc_layers],
    'Critic network joint hidden layer sizes.')
ACTOR_LEARNING_RATE = flags.DEFINE_float(
    'actor_learning_rate', _SAC.actor_learning_rate, 'Adam, actor.',
    lower_bound=0)
CRITIC_LEARNING_RATE = flags.DEFINE_float(
    'critic_learning_rate', _SAC.critic_learning_rate, 'Adam, critic.',
    lower_bound=0)
ALPHA_LEARNING_RATE = flags.DEFINE_float(
    'alpha_learning_rate', _SAC.alpha_learning_rate, 'Adam, entropy alpha.',
    lower_bound=0)
TARGET_UPDATE_TAU = flags.DEFINE_float(
    'target_update_tau', _SAC.target_update_tau, 'Target network soft update.',
    lower_bound=0, upper_bound=1)
TARGET_UPDATE_PERIOD = flags.DEFINE_integer(
    'target_update_period', _SAC.target_update_period,
    'Train steps between target updates.', lower_bound=1)
GAMMA = flags.DEFINE_float('gamma', _SAC.gamma, 'Discount.', lower_bound=0,
                           upper_bound=1)
REWARD_SCALE_FACTOR = flags.DEFINE_float(
    'reward_scale_factor', _SAC.reward_scale_factor, 'Reward scale.')
TARGET_ENTROPY = flags.DEFINE_float(
    'target_entropy', None,
    "SAC: the policy entropy alpha is tuned to hold (default: TF-Agents', "
    '-dim(A)/2). Below 0, the entropy term makes each step alive cost reward, '
    'which teaches falling on tasks that end when the robot falls.')
BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None,
    f'Global training batch size (default: sac {_SAC.batch_size}, dqn '
    f'{_DQN.batch_size}).', lower_bound=1)
Q_FC_LAYERS = flags.DEFINE_list(
    'q_fc_layers', [str(x) for x in _DQN.q_fc_layers],
    'dqn: Q network hidden layer sizes.')
DQN_LEARNING_RATE = flags.DEFINE_float(
    'dqn_learning_rate', _DQN.learning_rate, 'dqn: Adam learning rate.',
    lower_bound=0)
EPSILON_GREEDY = flags.DEFINE_float(
    'epsilon_greedy', _DQN.epsilon_greedy,
    'dqn: probability of a random action while collecting.', lower_bound=0,
    upper_bound=1)
DQN_TARGET_UPDATE_PERIOD = flags.DEFINE_integer(
    'dqn_target_update_period', _DQN.target_update_period,
    'dqn: train steps between target network copies.', lower_bound=1)
DQN_DOUBLE = flags.DEFINE_boolean(
    'dqn_double', _DQN.double,
    'dqn: Double DQN (the online network picks the next action, the target '
    'network values it); --nodqn_double: plain DQN.')
DQN_LOSS = flags.DEFINE_enum(
    'dqn_loss', _DQN.loss, ['squared', 'huber'],
    'dqn: TD error loss (huber: delta 1, as Ape-X; squared: the DQN tutorial).')
N_STEP = flags.DEFINE_integer(
    'n_step', _DQN.n_step,
    'dqn: N-step returns; replay items then hold N+1 steps. (SAC: 1 only; '
    "TF-Agents' SAC trains on 2-step transitions.)", lower_bound=1)
EPSILON_SCHEDULE = flags.DEFINE_enum(
    'epsilon_schedule', _DQN.epsilon_schedule, ['fixed', 'apex'],
    'dqn: fixed: every actor explores with --epsilon_greedy; apex: actor i '
    'of --num_actors with --apex_epsilon ** (1 + --apex_alpha * i / (N-1)), '
    'from exploratory to nearly greedy (Ape-X). The evaluator stays greedy.')
APEX_EPSILON = flags.DEFINE_float(
    'apex_epsilon', _DQN.apex_epsilon, 'dqn: epsilon of --epsilon_schedule='
    'apex.', lower_bound=0, upper_bound=1)
APEX_ALPHA = flags.DEFINE_float(
    'apex_alpha', _DQN.apex_alpha, 'dqn: alpha of --epsilon_schedule=apex.',
    lower_bound=0)

# --- Replay table.
REPLAY_CAPACITY = flags.DEFINE_integer(
    'replay_capacity', _REPLAY.replay_capacity,
    'Items (2-step transitions) the replay table holds.', lower_bound=1)
MIN_SIZE_TO_SAMPLE = flags.DEFINE_integer(
    'min_size_to_sample', _REPLAY.min_size_to_sample,
    'Items in the table before the learner may sample.', lower_bound=1)
SAMPLES_PER_INSERT = flags.DEFINE_float(
    'samples_per_insert', None,
    'Sampled items per inserted item (SampleToInsertRatio). Default: the '
    'batch size, i.e. one train step per env step, as in the tutorial.',
    lower_bound=0)
REPLAY = flags.DEFINE_enum(
    'replay', 'uniform', ['uniform', 'prioritized'],
    'uniform: the tutorial\'s uniform sampling. prioritized: items sampled '
    'in proportion to priority ** --priority_exponent; the learner writes '
    'each sampled item\'s |TD error| back as its priority and corrects with '
    'importance-sampling weights; new items enter at the largest recent '
    'priority. The table keeps the name uniform_table.')
PRIORITY_EXPONENT = flags.DEFINE_float(
    'priority_exponent', _REPLAY.priority_exponent,
    '--replay=prioritized: alpha; 0 samples uniformly.', lower_bound=0)
IMPORTANCE_SAMPLING_EXPONENT = flags.DEFINE_float(
    'importance_sampling_exponent', 0.4,
    '--replay=prioritized: beta of the importance-sampling weights at the '
    'first train step, annealed linearly to 1 at --train_steps.',
    lower_bound=0, upper_bound=1)
RATE_LIMITER = flags.DEFINE_enum(
    'rate_limiter', 'ratio', ['ratio', 'min_size'],
    'ratio: SampleToInsertRatio(--samples_per_insert); min_size: MinSize, '
    'the learner samples as fast as it can.')

# --- Schedule.
TRAIN_STEPS = flags.DEFINE_integer(
    'train_steps', 100000, 'Learner train steps.', lower_bound=1)
INITIAL_COLLECT_STEPS = flags.DEFINE_integer(
    'initial_collect_steps', 10000,
    'Random-policy env steps before collecting with the policy, split over '
    'the actors.', lower_bound=0)
NUM_ACTORS = flags.DEFINE_integer(
    'num_actors', 1, 'Collecting actors in the cluster.', lower_bound=1)
EVAL_INTERVAL = flags.DEFINE_integer(
    'eval_interval', 10000, 'Train steps between evaluations.',
    lower_bound=1)
NUM_EVAL_EPISODES = flags.DEFINE_integer(
    'num_eval_episodes', 20, 'Episodes per evaluation.', lower_bound=1)
POLICY_SAVE_INTERVAL = flags.DEFINE_integer(
    'policy_save_interval', 5000,
    'Train steps between policy SavedModels.', lower_bound=1)


def _layers(flag) -> tuple:
  try:
    layers = tuple(int(x) for x in flag.value)
  except ValueError:
    raise UserError(f'--{flag.name}={",".join(flag.value)}: expected '
                    'comma-separated positive integers, e.g. 256,256') from None
  if any(x <= 0 for x in layers):
    raise UserError(f'--{flag.name}: layer sizes must be positive')
  return layers


def batch_size() -> int:
  if BATCH_SIZE.value is not None:
    return BATCH_SIZE.value
  return _DQN.batch_size if AGENT.value == 'dqn' else _SAC.batch_size


def samples_per_insert() -> float:
  if SAMPLES_PER_INSERT.value is not None:
    return SAMPLES_PER_INSERT.value
  return float(batch_size())


def env_options():
  from common import environments  # pylint: disable=g-import-not-at-top
  return environments.EnvOptions(
      max_episode_steps=MAX_EPISODE_STEPS.value,
      discretize_actions=DISCRETIZE_ACTIONS.value,
      action_repeat=ACTION_REPEAT.value,
      validate_episodes=VALIDATE_ENV_EPISODES.value)


def agent_config() -> config_lib.AgentConfig:
  """The config of the agent --agent names, from the flags."""
  if AGENT.value == 'dqn':
    return config_lib.DqnConfig(
        q_fc_layers=_layers(Q_FC_LAYERS),
        learning_rate=DQN_LEARNING_RATE.value,
        epsilon_greedy=EPSILON_GREEDY.value,
        target_update_period=DQN_TARGET_UPDATE_PERIOD.value,
        gamma=GAMMA.value,
        batch_size=batch_size(),
        double=DQN_DOUBLE.value,
        loss=DQN_LOSS.value,
        n_step=N_STEP.value,
        epsilon_schedule=EPSILON_SCHEDULE.value,
        apex_epsilon=APEX_EPSILON.value,
        apex_alpha=APEX_ALPHA.value)
  if N_STEP.value != 1:
    raise UserError(f'--n_step={N_STEP.value} needs --agent=dqn: TF-Agents\' '
                    'SAC trains on 2-step transitions only')
  return config_lib.SacConfig(
      actor_fc_layers=_layers(ACTOR_FC_LAYERS),
      critic_joint_fc_layers=_layers(CRITIC_JOINT_FC_LAYERS),
      actor_learning_rate=ACTOR_LEARNING_RATE.value,
      critic_learning_rate=CRITIC_LEARNING_RATE.value,
      alpha_learning_rate=ALPHA_LEARNING_RATE.value,
      target_update_tau=TARGET_UPDATE_TAU.value,
      target_update_period=TARGET_UPDATE_PERIOD.value,
      gamma=GAMMA.value,
      reward_scale_factor=REWARD_SCALE_FACTOR.value,
      target_entropy=TARGET_ENTROPY.value,
      batch_size=batch_size())


def replay_config() -> config_lib.ReplayConfig:
  if MIN_SIZE_TO_SAMPLE.value > REPLAY_CAPACITY.value:
    raise UserError(
        f'--min_size_to_sample={MIN_SIZE_TO_SAMPLE.value} is larger than '
        f'--replay_capacity={REPLAY_CAPACITY.value}: the learner could never '
        'sample; lower it or raise the capacity')
  if RATE_LIMITER.value == 'ratio' and samples_per_insert() <= 0:
    raise UserError('--samples_per_insert must be > 0 with '
                    '--rate_limiter=ratio (or use --rate_limiter=min_size)')
  if (RATE_LIMITER.value == 'ratio' and
      MIN_SIZE_TO_SAMPLE.value < batch_size()):
    raise UserError(
        f'--samples_per_insert needs --min_size_to_sample '
        f'({MIN_SIZE_TO_SAMPLE.value}) >= --batch_size ({batch_size()}): '
        'the ratio is kept from the first batch on, so that batch must come '
        'from at least a batch of items; raise --min_size_to_sample')
  return config_lib.ReplayConfig(
      replay_capacity=REPLAY_CAPACITY.value,
      min_size_to_sample=MIN_SIZE_TO_SAMPLE.value,
      samples_per_insert=(samples_per_insert()
                          if RATE_LIMITER.value == 'ratio' else None),
      prioritized=REPLAY.value == 'prioritized',
      priority_exponent=PRIORITY_EXPONENT.value)


def replay_addresses() -> tuple:
  """The replay shards, in --replay_address order (one for an unsharded run)."""
  from common import reverb_connection  # pylint: disable=g-import-not-at-top
  return reverb_connection.parse_addresses(REPLAY_ADDRESS.value,
                                           'replay_address')


def replay_address() -> str:
  """The first replay shard: actor indices, max priority, default variables."""
  return replay_addresses()[0]


def variables_on_shards() -> bool:
  """True when no --variable_address is given: every replay shard serves the
  variables (the learner pushes to all of them, each actor reads its own)."""
  return not VARIABLE_ADDRESS.value


def run_contract() -> dict:
  """The settings every process of one run must share, by flag name.

  The replay server publishes its own (`common.contract`); every client
  compares its own with it at connect, so processes started with different
  flags never train on each other's data.
  """
  return {
      'env': ENV.value,
      'agent': AGENT.value,
      'max_episode_steps': MAX_EPISODE_STEPS.value,
      'discretize_actions': DISCRETIZE_ACTIONS.value,
      'action_repeat': ACTION_REPEAT.value,
      'gamma': GAMMA.value,
      'n_step': N_STEP.value,
      'replay': REPLAY.value,
      'reward_scale_factor': REWARD_SCALE_FACTOR.value,
  }


def variable_address() -> str:
  from common import reverb_connection  # pylint: disable=g-import-not-at-top
  if not VARIABLE_ADDRESS.value:
    return replay_address()
  return reverb_connection.parse_address(VARIABLE_ADDRESS.value,
                                         'variable_address')


# --- replay_server.
TABLES = flags.DEFINE_enum(
    'tables', 'replay_and_variables', ['replay_and_variables', 'replay'],
    'replay_server: tables to serve; "replay" when the variables live on a '
    'separate `python -m variable_container`.')

REPLAY_SHARD = flags.DEFINE_integer(
    'replay_shard', -1,
    'replay_server: the position of this server in --replay_address (its '
    'shard index; it hands out the --task=auto indices i with i mod S equal '
    'to it). -1: found from --port in --replay_address (0 with one shard).',
    lower_bound=-1)
ACTOR_LEASE_TIMEOUT_S = flags.DEFINE_float(
    'actor_lease_timeout_s', 30.0,
    'replay_server: a --task=auto index whose actor has not renewed it for '
    'this long (the actor is gone) is handed out again.', lower_bound=1)

# --- learner.
STRATEGY = flags.DEFINE_enum(
    'strategy', 'default', ['default', 'mirrored', 'tpu'],
    'learner: tf.distribute strategy. mirrored uses every GPU, or every '
    'logical CPU device when there is no GPU.')
TPU_ADDRESS = flags.DEFINE_string(
    'tpu_address', '', 'learner: TPU name or address for --strategy=tpu.')
LOGICAL_CPU_DEVICES = flags.DEFINE_integer(
    'logical_cpu_devices', 0,
    'learner: split the CPU into this many logical devices (0: leave as is); '
    'lets --strategy=mirrored run on a CPU-only machine.', lower_bound=0)
ALIVE_BONUS = flags.DEFINE_float(
    'alive_bonus', 0.0,
    'learner: added to the reward of each sampled transition after which the '
    'episode goes on (discount > 0), before --reward_scale_factor. A survival '
    'bonus in the training objective only: the replay table, the actors and '
    "the evaluator keep the environment's own rewards. 0: off.")
PUSH_INTERVAL_STEPS = flags.DEFINE_integer(
    'push_interval_steps', 100,
    'learner: train steps between pushes of the policy weights.',
    lower_bound=1)
ITERATIONS_PER_CALL = flags.DEFINE_integer(
    'iterations_per_call', 10,
    'learner: train steps run inside one tf.function call.', lower_bound=1)
SAMPLE_PARALLEL_READERS = flags.DEFINE_integer(
    'sample_parallel_readers', 2,
    'learner: parallel Reverb readers feeding the training batches.',
    lower_bound=1)
CHECKPOINT_INTERVAL_STEPS = flags.DEFINE_integer(
    'checkpoint_interval_steps', 10000,
    'learner: train steps between checkpoints.', lower_bound=1)
LOG_INTERVAL_S = flags.DEFINE_float(
    'log_interval_s', 10.0, 'Seconds between progress log lines.',
    lower_bound=0.1)

# --- actor.
MODE = flags.DEFINE_enum(
    'mode', 'collect', ['collect', 'eval'],
    'actor: collect experience, or evaluate the greedy policy.')
TASK = flags.DEFINE_string(
    'task', '0',
    "actor: index of this actor, or 'auto' to take the next free index from "
    'the replay server (replicas from one template, e.g. docker-compose '
    '--scale actor=4).')
ENVS_PER_ACTOR = flags.DEFINE_integer(
    'envs_per_actor', 1,
    'actor: environments one actor steps together (one batched policy call '
    'per step of all of them); with --env_processes=K, in each of the K '
    'subprocesses.', lower_bound=1)
ENV_PROCESSES = flags.DEFINE_integer(
    'env_processes', 1,
    'actor: environments stepped in this many subprocesses, one each, behind '
    'one batched policy call (1: in the actor process). Lets one actor fill '
    'several cores.', lower_bound=1)
PULL_INTERVAL_STEPS = flags.DEFINE_integer(
    'pull_interval_steps', 100,
    'actor: env steps between pulls of the policy weights.', lower_bound=1)
ENV_STEP_TIMEOUT_S = flags.DEFINE_float(
    'env_step_timeout_s', 60.0,
    'actor: an environment step or reset that takes longer than this ends '
    'the actor with one line and exit code 2 (a hung environment).',
    lower_bound=0.1)
STOP_TIMEOUT_S = flags.DEFINE_float(
    'stop_timeout_s', 30.0,
    'actor: seconds after SIGTERM/SIGINT by which the actor has exited; past '
    'them it exits at once (code 1) with one line.', lower_bound=0.1)
MAX_TRAIN_STEPS = flags.DEFINE_integer(
    'max_train_steps', 0,
    "actor: exit once the learner's train_step reaches this; 0: "
    '--train_steps.', lower_bound=0)


def task():
  """The actor index, or None for 'auto'."""
  if TASK.value == 'auto':
    return None
  if not TASK.value.isdigit():
    raise UserError(f"--task={TASK.value!r}: expected an index >= 0 or 'auto'")
  return int(TASK.value)


def max_train_steps() -> int:
  return MAX_TRAIN_STEPS.value or TRAIN_STEPS.value

# --- launcher.
WITH_EVALUATOR = flags.DEFINE_boolean(
    'with_evaluator', True, 'launcher: also start an evaluator.')
RESTART_ACTORS = flags.DEFINE_boolean(
    'restart_actors', True, 'launcher: restart an actor that dies.')
MAX_ACTOR_RESTARTS = flags.DEFINE_integer(
    'max_actor_restarts', 5,
    'launcher: consecutive failures after which a dead actor is not '
    'restarted (the count resets once it has run --healthy_after_s).',
    lower_bound=0)
RESTART_BACKOFF_S = flags.DEFINE_float(
    'restart_backoff_s', 2.0,
    'launcher: delay before restarting a dead actor, doubled with every '
    'consecutive failure (at most 60s).', lower_bound=0)
HEALTHY_AFTER_S = flags.DEFINE_float(
    'healthy_after_s', 60.0,
    'launcher: an actor that has run this long counts as healthy: its '
    'consecutive-failure count starts again from 0.', lower_bound=0)
SHOW_CHILD_LOGS = flags.DEFINE_boolean(
    'show_child_logs', True,
    "launcher: echo every child's log lines, prefixed with its role (they "
    'are always written to <root_dir>/logs/<role>.log).')
PROGRESS_INTERVAL_S = flags.DEFINE_float(
    'progress_interval_s', 10.0, 'launcher: seconds between progress lines.',
    lower_bound=0.1)
REPLAY_SHARDS = flags.DEFINE_integer(
    'replay_shards', 1,
    'launcher: replay servers to start (shards); actor i writes to shard '
    'i mod S and the learner samples from all of them.', lower_bound=1)

# --- evaluator (actor --mode=eval).
VIDEO_EPISODES = flags.DEFINE_integer(
    'video_episodes', 1,
    'evaluator: greedy episodes rendered into each mp4 (0: no video).',
    lower_bound=0)
VIDEO_INTERVAL = flags.DEFINE_integer(
    'video_interval', 0,
    'evaluator: also write a video every this many train steps (0: only at '
    'the end of training).', lower_bound=0)
VIDEO_SIZE = flags.DEFINE_list(
    'video_size', ['480', '360'],
    'evaluator: width,height of Minitaur video frames (its software renderer '
    'takes time in proportion to pixels; the environment default is 960,720).')


def video_size() -> tuple:
  try:
    width, height = (int(x) for x in VIDEO_SIZE.value)
  except ValueError:
    raise UserError(f'--video_size={",".join(VIDEO_SIZE.value)}: expected '
                    'width,height, e.g. 480,360') from None
  if width <= 0 or height <= 0:
    raise UserError('--video_size: width and height must be positive')
  return width, height

# --- replay_server persistence.
CHECKPOINT_DIR = flags.DEFINE_string(
    'checkpoint_dir', '',
    'replay_server: directory for Reverb checkpoints of every table (replay, '
    'variables, actor indices); restored at start. Empty: no persistence.')
CHECKPOINT_INTERVAL_S = flags.DEFINE_float(
    'checkpoint_interval_s', 600,
    'replay_server: seconds between table checkpoints (one is also written '
    'on SIGTERM).', lower_bound=1)
ACTOR_LEASE_GRACE_S = flags.DEFINE_float(
    'actor_lease_grace_s', 8.0,
    'replay_server: seconds after start before it hands out --task=auto actor '
    'indices, while live actors (which renew theirs every 2s) tell it which '
    'they hold; so a restart never hands out an index twice.', lower_bound=0)
