"""python -m tests.stub_child: a stand-in child for Supervisor tests.

Starts in a fraction of a second (no TensorFlow), says `stub started`, then
does what its arguments say:
  --exit_after_s=S --code=N  exit with code N after S seconds (else: run until
                             SIGTERM, then exit 0);
  --stop_delay_s=S           on SIGTERM, take S more seconds to exit (a slow
                             learner writing its final checkpoint);
  --log_bytes=B              first write B bytes of log lines (more than a
                             pipe holds: it blocks unless they are read);
  --say=LINE                 write LINE (as often as given): log text that
                             looks like a role's.
"""

import argparse
import signal
import sys
import threading
import time


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--exit_after_s', type=float, default=None)
  parser.add_argument('--code', type=int, default=0)
  parser.add_argument('--stop_delay_s', type=float, default=0.0)
  parser.add_argument('--log_bytes', type=int, default=0)
  parser.add_argument('--say', action='append', default=[])
  args = parser.parse_args()
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  print('stub started', flush=True)
  line = 'x' * 99 + '\n'
  for _ in range(args.log_bytes // len(line) + 1):
    sys.stdout.write(line)
  for text in args.say:
    print(text, flush=True)
  print('stub wrote its log lines', flush=True)
  if stop.wait(args.exit_after_s):
    print(f'stub stopping in {args.stop_delay_s}s', flush=True)
    time.sleep(args.stop_delay_s)
    print('stub stopped', flush=True)
    return 0
  print(f'stub exits with code {args.code}', flush=True)
  return args.code


if __name__ == '__main__':
  sys.exit(main())
