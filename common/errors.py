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
