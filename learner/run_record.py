"""What the learner's checkpoints hold, and guards around writing and reading them.

Owns `<root_dir>/train/run_settings.json` (the settings that define a run,
written before its first checkpoint) and the learner's checkpoints: a
`tf_agents.utils.common.Checkpointer` on the directory and objects of
TF-Agents' `Learner` (so each restores what the other wrote):

  * a rerun on the same --root_dir with other settings is refused in one line
    instead of resuming another run;
  * a checkpoint that holds NaN/inf (written by an older version) or cannot
    be read is skipped at restore: the newest sound one is restored;
  * nothing non-finite is ever checkpointed, and a failed write (disk full)
    is logged and retried at the next interval.

TensorFlow's `CheckpointManager` lists a checkpoint in its `checkpoint` state
file only after every file of it is written (a write callback), so a write
cut short (disk full, SIGKILL) leaves files that are never restored.
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import List, Optional

from absl import logging
import numpy as np
import tensorflow as tf
from tf_agents.train import learner as tfa_learner
from tf_agents.utils import common as tfa_common

from common import agents
from common import config as config_lib
from common.errors import UserError
from common.errors import one_line

SETTINGS_FILE = 'run_settings.json'

# Checkpoints kept (TF-Agents' Learner's default, which the learner passes).
MAX_CHECKPOINTS = 3

# Errors of a failed write: disk full (ENOSPC as OSError, or TensorFlow's
# file-system errors), a directory gone or read-only.
WRITE_ERRORS = (OSError, tf.errors.ResourceExhaustedError,
                tf.errors.UnknownError, tf.errors.InternalError,
                tf.errors.FailedPreconditionError,
                tf.errors.PermissionDeniedError, tf.errors.NotFoundError,
                tf.errors.DataLossError)

def describe_error(error: Exception) -> str:
  """One line of a failed write: TensorFlow's op prefix dropped, the reason
  (e.g. 'No space left on device') kept."""
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', ' '.join(str(error).split()))
  if len(text) > 240:
    text = text[:100] + ' ... ' + text[-135:]
  return text or type(error).__name__


def train_dir(root_dir: str) -> str:
  return os.path.join(root_dir, tfa_learner.TRAIN_DIR)


def checkpoint_dir(root_dir: str) -> str:
  return os.path.join(train_dir(root_dir), tfa_learner.POLICY_CHECKPOINT_DIR)


def checkpointer(root_dir: str, agent,
                 train_step: tf.Variable) -> tfa_common.Checkpointer:
  """A checkpointer of `agent` and `train_step` where TF-Agents' `Learner`
  keeps them, under the same names: it restores the Learner's checkpoints and
  the Learner restores its. Restores the latest one as it is built."""
  return tfa_common.Checkpointer(checkpoint_dir(root_dir),
                                 max_to_keep=MAX_CHECKPOINTS, agent=agent,
                                 train_step=train_step)


def has_checkpoint(root_dir: str) -> bool:
  return tf.train.get_checkpoint_state(checkpoint_dir(root_dir)) is not None


def _describe_specs(spec) -> str:
  return ', '.join(f'{s.dtype.name}{s.shape.as_list()}'
                   for s in tf.nest.flatten(spec))


def run_settings(env_name: str, agent_config: config_lib.AgentConfig,
                 env_options, prioritized: bool, seed: int, alive_bonus: float,
                 agent) -> dict:
  """The settings that define a run, by flag name, in the order compared.

  The environment and agent first: where they differ, the specs differ too,
  and the line should name the cause.
  """
  is_dqn = isinstance(agent_config, config_lib.DqnConfig)
  settings = {'env': env_name, 'agent': 'dqn' if is_dqn else 'sac'}
  options = dataclasses.asdict(env_options)
  options.pop('validate_episodes', None)  # A check, not part of the data.
  settings.update(options)
  for name, value in dataclasses.asdict(agent_config).items():
    # Not part of what a run is: a resume may lower the learning rates (the
    # fix this learner suggests for non-finite weights) or change the batch.
    if 'learning_rate' in name or name == 'batch_size':
      continue
    settings[config_lib.flag_name(type(agent_config), name)] = value
  settings['replay'] = 'prioritized' if prioritized else 'uniform'
  settings['alive_bonus'] = alive_bonus
  settings['seed'] = seed
  settings['replay_signature'] = _describe_specs(
      agents.replay_signature(agent))
  settings['variables'] = _describe_specs(
      [tf.TensorSpec(v.shape, v.dtype) for v in agent.variables])
  # As read back from JSON (tuples become lists), so that equal is equal.
  return json.loads(json.dumps(settings))


def _flag_value(value) -> str:
  if isinstance(value, list):
    return ','.join(str(x) for x in value)
  return str(value)


def _settings_path(root_dir: str) -> str:
  return os.path.join(train_dir(root_dir), SETTINGS_FILE)


def check_recorded(root_dir: str, settings: dict) -> bool:
  """Refuses a --root_dir whose checkpoints are another run's.

  Returns whether `<root_dir>/train/run_settings.json` exists (and matches).

  Raises:
    UserError: it records other settings.
  """
  path = _settings_path(root_dir)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({e}); delete '
                    f'{train_dir(root_dir)} to start afresh, or give '
                    'another --root_dir') from None
  for name, value in settings.items():
    if name not in recorded and value is None:
      continue  # A setting added since the run was recorded, and left off.
    old = recorded.get(name, '(not recorded)')
    if old != value:
      raise UserError(
          f'--root_dir={root_dir} holds the checkpoints of another run: '
          f'it ran with --{name}={_flag_value(old)}, this one has '
          f'--{name}={_flag_value(value)}; give another --root_dir, or '
          f'delete {train_dir(root_dir)} to start afresh')
  return True


def record(root_dir: str, settings: dict) -> None:
  """Writes the run's settings beside its checkpoints (before the first one,
  or after a restore of an older version's checkpoint has succeeded)."""
  path = _settings_path(root_dir)
  os.makedirs(train_dir(root_dir), exist_ok=True)
  try:
    # Written whole or not at all: a rename is atomic.
    with open(path + '.tmp', 'w') as f:
      json.dump(settings, f, indent=1)
    os.replace(path + '.tmp', path)
  except OSError as e:
    raise UserError(f'cannot write {path} ({e.strerror}); free space under '
                    f'--root_dir={root_dir} or give another one') from None
  logging.info('learner: run settings written to %s', path)


def non_finite_tensors(path: str) -> List[str]:
  """Names of the floating-point tensors in checkpoint `path` holding NaN/inf.

  Raises what TensorFlow raises for a checkpoint it cannot read.
  """
  reader = tf.train.load_checkpoint(path)
  bad = []
  for name, dtype in sorted(reader.get_variable_to_dtype_map().items()):
    if not dtype.is_floating:
      continue
    if not np.all(np.isfinite(reader.get_tensor(name))):
      bad.append(name)
  return bad


def choose_checkpoint(root_dir: str) -> Optional[str]:
  """Makes the newest sound checkpoint the one to restore; returns it.

  A checkpoint holding non-finite values, or one that cannot be read, is
  taken off the `checkpoint` state file (its files stay on disk, for a look)
  with a warning saying which one and why; the restore inside TF-Agents'
  Learner then takes the newest of the others. None: nothing to restore.
  """
  directory = checkpoint_dir(root_dir)
  state = tf.train.get_checkpoint_state(directory)
  if state is None or not state.model_checkpoint_path:
    return None
  paths = list(state.all_model_checkpoint_paths) or [
      state.model_checkpoint_path]
  paths = [p if os.path.isabs(p) else os.path.join(directory, p)
           for p in paths]
  kept = list(paths)
  for path in reversed(paths):
    try:
      bad = non_finite_tensors(path)
      why = (f'{len(bad)} tensors hold NaN or inf, e.g. {bad[0]}'
             if bad else '')
    except Exception as e:  # pylint: disable=broad-except
      why = f'unreadable: {one_line(e)}'
    if not why:
      break
    kept.remove(path)
    logging.warning('learner: skipping checkpoint %s (%s); %s', path, why,
                    f'resuming from {kept[-1]}' if kept else
                    'no other checkpoint: starting afresh')
  if kept == paths:
    return paths[-1]
  if kept:
    tf.compat.v1.train.update_checkpoint_state(directory, kept[-1],
                                               all_model_checkpoint_paths=kept)
    return kept[-1]
  os.remove(os.path.join(directory, 'checkpoint'))
  return None


def non_finite_variables(variables) -> List[str]:
  return [v.name for v in tf.nest.flatten(variables)
          if v.dtype.is_floating and not np.all(np.isfinite(v.numpy()))]


def weights_error(step: int, bad: List[str], what_not_done: str
                  ) -> UserError:
  """The one line that ends training on non-finite weights `bad`."""
  return UserError(f'weights became non-finite at train_step {step} '
                   f'({len(bad)} variables, e.g. {bad[0]}); {what_not_done}: '
                   'lower the learning rates or the reward scale')


class Checkpoints:
  """The learner's checkpoints: restore checked, saves guarded.

  Built after TF-Agents' `Learner` (which has restored the checkpoint
  `choose_checkpoint` left newest, and created every optimizer variable), on
  the same directory and objects (`checkpointer`).
  """

  def __init__(self, root_dir: str, agent, train_step: tf.Variable,
               restored: Optional[str]):
    self._checkpointer = checkpointer(root_dir, agent, train_step)
    self._agent = agent
    self._train_step = train_step
    self.last_saved: Optional[str] = restored
    if restored is not None:
      try:
        self._checkpointer.initialize_or_restore(
        ).assert_existing_objects_matched()
      except AssertionError as e:
        raise UserError(
            f'checkpoint {restored} was written for another agent or other '
            f'networks ({one_line(e)}); give another '
            f'--root_dir, or delete {train_dir(root_dir)} to start afresh'
        ) from None

  def save(self) -> bool:
    """Writes a checkpoint of finite variables; False if the write failed.

    Raises:
      UserError: a variable is NaN or inf (it is then not written).
    """
    step = int(self._train_step.numpy())
    bad = non_finite_variables(self._agent.variables)
    if bad:
      raise weights_error(step, bad, 'not checkpointed (the last checkpoint '
                          f'is {self.last_saved})')
    try:
      self._checkpointer.save(self._train_step)
    except WRITE_ERRORS as e:
      logging.error('learner: checkpoint at train_step %d failed (%s); '
                    'training goes on, the next interval tries again', step,
                    describe_error(e))
      return False
    self.last_saved = self._checkpointer.manager.latest_checkpoint
    return True


def fingerprint(variables) -> str:
  """A short hash of the values of `variables` (a nest): workers of one
  multi-worker learner that trained in lockstep print the same one."""
  digest = hashlib.sha256()
  for v in tf.nest.flatten(variables):
    digest.update(np.ascontiguousarray(v.numpy()).tobytes())
  return digest.hexdigest()[:16]
