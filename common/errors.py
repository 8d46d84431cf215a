"""The one exception type a user is meant to read.

Anything raised as `UserError` is printed by the process entry point as a
single line (no traceback) and the process exits non-zero. Its message names
the problem and, where there is one, the fix.
"""


class UserError(Exception):
  """A problem with the user's input or set-up, explained in one line."""
