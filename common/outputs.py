"""Checks on a process's own output directory, made before any work starts."""

import os

from common.errors import UserError


def ensure_writable_dir(path: str, flag: str = 'root_dir') -> str:
  """Creates `path` if needed; UserError unless a file can be written in it."""
  if not path:
    raise UserError(f'--{flag} is empty')
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--{flag}={path} is not writable ({e.strerror}); give a '
                    'directory this user can write') from None
  return path
