"""python -m launcher.status_feed ADDRESSES: the cluster's status as data.

The launcher's window onto the cluster (launcher/progress_line.py starts it).
Each reading takes, from the first replay shard that answers, the learner's
and the evaluator's latest status (variable_container/status.py), and from
every shard the replay table's insert count, and is written to stdout as one
JSON line:
  {"learner": {...} | null, "evaluator": {...} | null,
   "inserted_items": {address: count, ...}, "requested": true | false}
It reads every --interval_s, and at once for each line that comes on stdin
(the launcher asking for a fresh reading, `requested` true); stdin closing
(the launcher gone) ends it.

A process of its own, not a thread of the launcher: reading Reverb means
importing TensorFlow, which the launcher never loads (it forks every child;
TensorFlow's start-up time, memory and noise belong to the roles).
"""

import argparse
import json
import os
import select
import sys
from typing import Dict, List

import reverb

from variable_container import status


def _first_answering(addresses: List[str]):
  """(client, server_info) of the first shard that answers, or (None, None)."""
  for address in addresses:
    client = reverb.Client(address)
    try:
      return client, client.server_info(timeout=2)
    except Exception:  # pylint: disable=broad-except
      continue  # A shard down or still starting: ask the next one.
  return None, None


def reading(addresses: List[str]) -> Dict:
  """One reading of the cluster's status (the module docstring's JSON)."""
  client, info = _first_answering(addresses)
  roles = {role: None for role in (status.LEARNER, status.EVALUATOR)}
  if client is not None:
    for role in roles:
      roles[role] = status.read(client, role, server_info=info)
  # Per shard, so that the launcher counts each shard's growth on its own (a
  # restarted shard counts from 0 again).
  inserted = {}
  for address in addresses:
    count = status.inserted_items([address])
    if count is not None:
      inserted[address] = count
  return dict(roles, inserted_items=inserted)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m launcher.status_feed')
  parser.add_argument('addresses',
                      help='the replay shards, host:port[,host:port...]')
  parser.add_argument('--interval_s', type=float, default=1.0,
                      help='seconds between readings')
  args = parser.parse_args(argv)
  addresses = [a for a in args.addresses.split(',') if a]
  stdin = sys.stdin.fileno()
  requested = False
  while True:
    line = json.dumps(dict(reading(addresses), requested=requested))
    try:
      sys.stdout.write(line + '\n')
      sys.stdout.flush()
    except BrokenPipeError:
      return 0  # The launcher is gone.
    ready, _, _ = select.select([stdin], [], [], args.interval_s)
    requested = bool(ready)
    if ready and not os.read(stdin, 4096):
      return 0  # stdin closed: the launcher is done with us.


if __name__ == '__main__':
  sys.exit(main())
