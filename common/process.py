"""What every process entry point shares: quiet start-up, one-line errors, stop signals.

Import this module before TensorFlow: it turns TensorFlow's C++ start-up noise
down unless the user asked for it.
"""

import os
import signal
import sys
import threading

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from common.errors import UserError  # pylint: disable=g-import-not-at-top


class StopRequest:
  """Set by SIGTERM/SIGINT; loops poll it and finish their current step."""

  def __init__(self):
    self._event = threading.Event()
    self.signal_name = None

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, _frame):
    if self._event.is_set():
      # A second signal means the user is out of patience.
      logging.warning('second %s: exiting now', signal.Signals(signum).name)
      os._exit(1)  # pylint: disable=protected-access
    self.signal_name = signal.Signals(signum).name
    logging.info('%s received: finishing the current step, then exiting',
                 self.signal_name)
    self._event.set()

  def __call__(self) -> bool:
    return self._event.is_set()

  def wait(self, seconds: float) -> bool:
    return self._event.wait(seconds)


def run(main, program: str):
  """Runs `main(argv)` under absl; a UserError becomes one line and exit 2."""

  def _main(argv):
    if len(argv) > 1:
      sys.stderr.write(f'{program}: error: unexpected arguments {argv[1:]}; '
                       'flags are given as --name=value\n')
      sys.exit(2)
    try:
      main(argv)
    except UserError as e:
      logging.flush()
      sys.stderr.write(f'{program}: error: {e}\n')
      sys.stderr.flush()
      os._exit(2)  # pylint: disable=protected-access

  def _parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.stderr.write(f'{program}: error: {e} (see --helpfull)\n')
      sys.exit(2)

  app.run(_main, flags_parser=_parse_flags)
