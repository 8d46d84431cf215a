"""python -m launcher: a whole cluster on this machine, one OS process per role.

Every flag given to the launcher (including --flagfile) is passed on to every
child; the launcher adds only what differs per child (port, task, mode).
"""

import os
import sys

from common import process  # Must precede TensorFlow imports.

from absl import flags
import portpicker

from common import config as config_lib
from common import config_flags
from common import presets
from common.errors import UserError
from launcher import supervisor


def children(config: config_lib.LauncherConfig, argv_flags, ports,
             root_dir: str):
  """The cluster's processes; one replay server (shard) per port."""
  addresses = ','.join(f'localhost:{port}' for port in ports)
  common_args = list(argv_flags) + [f'--replay_address={addresses}',
                                    '--variable_address=']
  kids = []
  for shard, port in enumerate(ports):
    server_args = [f'--port={port}', f'--replay_shard={shard}']
    # Each shard's checkpoints in a directory of its own, never one inside
    # another's: Reverb keeps only the entry of a checkpoint directory whose
    # name sorts last and deletes the rest, so a shard_1/ inside shard 0's
    # directory would delete every checkpoint shard 0 writes.
    if not config.checkpoint_dir:
      # Replay persists under the run's root_dir, so a re-run resumes it.
      server_args.append('--checkpoint_dir=' + os.path.join(
          root_dir, 'replay_checkpoints' + (f'_{shard}' if shard else '')))
    elif len(ports) > 1:
      server_args.append('--checkpoint_dir=' + os.path.join(
          config.checkpoint_dir, f'shard_{shard}'))
    name = 'replay_server' + (f'_{shard}' if shard else '')
    kids.append(supervisor.Child(name, 'replay_server',
                                 common_args + server_args))
  kids += learners(config, common_args)
  for task in range(config.num_actors):
    kids.append(supervisor.Child(
        f'actor_{task}', 'actor',
        common_args + [f'--task={task}', '--mode=collect'],
        restartable=config.restart_actors))
  if config.with_evaluator:
    kids.append(supervisor.Child('evaluator', 'actor',
                                 common_args + ['--mode=eval']))
  return kids


def learners(config: config_lib.LauncherConfig, common_args):
  """The learner, or with --learner_workers=N the N workers of one
  multi-worker learner on this machine (worker 0, the chief, is `learner`).
  """
  workers = config.learner_workers
  if not workers:
    return [supervisor.Child('learner', 'learner', common_args)]
  if not isinstance(workers, int):
    raise UserError('launcher: --learner_workers takes a count N (it starts '
                    'N learner workers on this machine); to run workers on '
                    'several machines, start `python -m learner` on each')
  addresses = ','.join(f'localhost:{portpicker.pick_unused_port()}'
                       for _ in range(workers))
  return [supervisor.Child(
      'learner' + (f'_{i}' if i else ''), 'learner',
      common_args + ['--strategy=multi_worker',
                     f'--learner_workers={addresses}', f'--learner_index={i}'],
      group='learner') for i in range(workers)]


def main(_):
  # Fails here, once, rather than in every child.
  config = config_flags.build(config_lib.LauncherConfig)
  port = (config.port if flags.FLAGS['port'].present
          else portpicker.pick_unused_port())
  ports = [port] + [portpicker.pick_unused_port()
                    for _ in range(config.num_replay_shards - 1)]
  root_dir = os.path.abspath(config.root_dir)
  os.makedirs(root_dir, exist_ok=True)
  argv_flags = [a for a in sys.argv[1:] if not a.startswith('--root_dir')]
  argv_flags.append(f'--root_dir={root_dir}')
  preset = presets.resolve(config.preset, config.env_name)
  print(f'[launcher] --env={config.env_name} --preset={preset or "none"}'
        + (f' ({os.path.join(presets.PRESET_DIR, preset + ".cfg")}; flags '
           'you give win)' if preset else ' (flag defaults)'), flush=True)
  sup = supervisor.Supervisor(
      children(config, argv_flags, ports, root_dir),
      os.path.join(root_dir, 'logs'),
      train_steps=config.train_steps,
      show_child_logs=config.show_child_logs,
      progress_interval_s=config.progress_interval_s,
      max_restarts=config.max_actor_restarts,
      restart_backoff_s=config.restart_backoff_s,
      healthy_after_s=config.healthy_after_s,
      # An actor's own deadline after SIGTERM (--stop_timeout_s) comes first,
      # so it says why it is late before the launcher kills it.
      stop_grace_s={'actor': config.stop_timeout_s + 5,
                    'evaluator': config.stop_timeout_s + 5},
      replay_addresses=[f'localhost:{port}' for port in ports])
  sys.exit(sup.run())


if __name__ == '__main__':
  process.run(main, 'launcher')
