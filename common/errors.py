"""The one exception type a user is meant to read.

Anything raised as `UserError` is printed by the process entry point as a
single line (no traceback) and the process exits non-zero. Its message names
the problem and, where there is one, the fix.
"""


class UserError(Exception):
  """A problem with the user's input or set-up, explained in one line."""


def one_line(error: BaseException, limit: int = 160,
             whole: bool = False) -> str:
  """`error` as one short line for a log or a UserError: its first line (or,
  with `whole`, all its lines joined), cut to `limit` characters, or its
  type's name when it has no message.

  The one place an error is shortened, so every message reads alike.
  """
  lines = str(error).strip().splitlines()
  if whole:
    lines = [' '.join(lines)]
  text = ' '.join(lines[0].split())[:limit] if lines else ''
  return text or type(error).__name__


_REASON_WORDS = ('abort', 'heartbeat', 'timed out', 'timeout', 'deadline',
                 'unavailable', 'connect', 'socket', 'cancel', 'peer',
                 'error')


def op_error_reason(error: BaseException, limit: int = 200) -> str:
  """The line of a TensorFlow error that says why: its first line is often
  'Graph execution error:' or 'in user code:', the rest a traceback and
  node names."""
  lines = [' '.join(line.split()) for line in str(error).splitlines()]
  lines = [line for line in lines if line and not line.startswith(
      ('[[', 'File ', 'Detected at node', 'Graph execution error',
       'in user code'))]
  for line in reversed(lines):
    if any(word in line.lower() for word in _REASON_WORDS):
      return line[:limit]
  return lines[-1][:limit] if lines else type(error).__name__
