"""Exit 0 when the Reverb server on localhost:<port> answers server_info."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import reverb  # pylint: disable=g-import-not-at-top

port = sys.argv[1] if len(sys.argv) > 1 else '8000'
try:
  reverb.Client(f'localhost:{port}').server_info(timeout=5)
except Exception as e:  # pylint: disable=broad-except
  print(f'reverb server on port {port} not answering: {type(e).__name__}')
  sys.exit(1)
