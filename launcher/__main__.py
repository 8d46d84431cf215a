"""python -m launcher: a whole cluster on this machine, one OS process per role.

Every flag given to the launcher (including --flagfile) is passed on to every
child; the launcher adds only what differs per child (port, task, mode).
"""

import os
import sys

from common import process  # Must precede TensorFlow imports.

from absl import flags
import portpicker

from common import cluster_flags as cf
from common import presets
from launcher import supervisor


def children(argv_flags, ports, root_dir: str):
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
    if not cf.CHECKPOINT_DIR.value:
      # Replay persists under the run's root_dir, so a re-run resumes it.
      server_args.append('--checkpoint_dir=' + os.path.join(
          root_dir, 'replay_checkpoints' + (f'_{shard}' if shard else '')))
    elif len(ports) > 1:
      server_args.append('--checkpoint_dir=' + os.path.join(
          cf.CHECKPOINT_DIR.value, f'shard_{shard}'))
    name = 'replay_server' + (f'_{shard}' if shard else '')
    kids.append(supervisor.Child(name, 'replay_server',
                                 common_args + server_args))
  kids.append(supervisor.Child('learner', 'learner', common_args))
  for task in range(cf.NUM_ACTORS.value):
    kids.append(supervisor.Child(
        f'actor_{task}', 'actor',
        common_args + [f'--task={task}', '--mode=collect'],
        restartable=cf.RESTART_ACTORS.value))
  if cf.WITH_EVALUATOR.value:
    kids.append(supervisor.Child('evaluator', 'actor',
                                 common_args + ['--mode=eval']))
  return kids


def main(_):
  cf.replay_config()  # Fail here, once, rather than in every child.
  cf.agent_config()
  port = (cf.PORT.value if flags.FLAGS['port'].present
          else portpicker.pick_unused_port())
  ports = [port] + [portpicker.pick_unused_port()
                    for _ in range(cf.REPLAY_SHARDS.value - 1)]
  root_dir = os.path.abspath(cf.ROOT_DIR.value)
  os.makedirs(root_dir, exist_ok=True)
  argv_flags = [a for a in sys.argv[1:] if not a.startswith('--root_dir')]
  argv_flags.append(f'--root_dir={root_dir}')
  preset = presets.resolve(cf.PRESET.value, cf.ENV.value)
  print(f'[launcher] --env={cf.ENV.value} --preset={preset or "none"}'
        + (f' ({os.path.join(presets.PRESET_DIR, preset + ".cfg")}; flags '
           'you give win)' if preset else ' (flag defaults)'), flush=True)
  sup = supervisor.Supervisor(
      children(argv_flags, ports, root_dir), os.path.join(root_dir, 'logs'),
      train_steps=cf.TRAIN_STEPS.value,
      show_child_logs=cf.SHOW_CHILD_LOGS.value,
      progress_interval_s=cf.PROGRESS_INTERVAL_S.value,
      max_restarts=cf.MAX_ACTOR_RESTARTS.value,
      restart_backoff_s=cf.RESTART_BACKOFF_S.value,
      healthy_after_s=cf.HEALTHY_AFTER_S.value,
      # An actor's own deadline after SIGTERM (--stop_timeout_s) comes first,
      # so it says why it is late before the launcher kills it.
      stop_grace_s={'actor': cf.STOP_TIMEOUT_S.value + 5,
                    'evaluator': cf.STOP_TIMEOUT_S.value + 5},
      replay_addresses=[f'localhost:{port}' for port in ports])
  sys.exit(sup.run())


if __name__ == '__main__':
  process.run(main, 'launcher')
