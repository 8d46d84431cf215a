"""Every hyperparameter of the agents and the replay table, with its default.

SAC defaults are those of the TF-Agents "SAC Minitaur with the Actor-Learner
API" tutorial; DQN defaults follow the TF-Agents DQN tutorial. All processes
build their agent, networks and table signatures from one config, so two
processes given the same flags agree on every spec without exchanging files.
"""

import dataclasses
from typing import Optional, Tuple, Union



@dataclasses.dataclass(frozen=True)
class SacConfig:
  """SAC hyperparameters (tutorial defaults)."""
  actor_fc_layers: Tuple[int, ...] = (256, 256)
  critic_joint_fc_layers: Tuple[int, ...] = (256, 256)
  actor_learning_rate: float = 3e-4
  critic_learning_rate: float = 3e-4
  alpha_learning_rate: float = 3e-4
  target_update_tau: float = 0.005
  target_update_period: int = 1
  gamma: float = 0.99
  reward_scale_factor: float = 1.0
  # Entropy alpha is tuned to keep the policy's entropy here. None: TF-Agents'
  # default, -dim(A)/2.
  target_entropy: Optional[float] = None
  batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class DqnConfig:
  """DQN hyperparameters (TF-Agents DQN tutorial), for discrete actions."""
  q_fc_layers: Tuple[int, ...] = (100, 50)
  learning_rate: float = 1e-3
  epsilon_greedy: float = 0.1
  # The tutorial updates the target network every step (tau 1, period 1);
  # a slower target is steadier when actors feed the learner asynchronously.
  target_update_tau: float = 1.0
  target_update_period: int = 100
  gamma: float = 0.99
  batch_size: int = 64
  # Double DQN (van Hasselt et al.), as Ape-X. The loss stays the tutorial's
  # squared TD error: the Huber loss (delta 1, Ape-X's) halved CartPole's
  # final return here, 3 seeds each (LEARNING.md, "DQN loss").
  double: bool = True
  loss: str = 'squared'  # or 'huber'
  # N-step returns: replay items of n_step + 1 steps.
  n_step: int = 1
  # 'fixed': every actor explores with epsilon_greedy. 'apex': actor i of N
  # with apex_epsilon ** (1 + apex_alpha * i / (N - 1)) (Ape-X).
  epsilon_schedule: str = 'fixed'
  apex_epsilon: float = 0.4
  apex_alpha: float = 7.0


AgentConfig = Union[SacConfig, DqnConfig]


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  """Replay table settings (tutorial defaults).

  `samples_per_insert` is the number of sampled items per inserted item. With
  batches of 256 the default 256 means one train step per environment step,
  the ratio of the tutorial's single-process loop. `None` uses a plain
  `MinSize` limiter and lets the learner sample as fast as it can.
  """
  replay_capacity: int = 10000
  min_size_to_sample: int = 10000
  samples_per_insert: float = 256.0
  # Slack of the SampleToInsertRatio limiter, as a fraction of
  # `min_size_to_sample * samples_per_insert` (TF-Agents' distributed examples
  # use 0.1).
  samples_per_insert_tolerance: float = 0.1
  # Prioritized replay (Schaul et al.): items sampled with probability
  # priority ** priority_exponent; the learner writes |TD error| priorities.
  prioritized: bool = False
  priority_exponent: float = 0.6
