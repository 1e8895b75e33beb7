"""The user's mistakes, told apart from capfilt's bugs.

A ``UserError`` (a missing shard, an unknown config key, a model reference that names no model) says
in its message what to fix; the CLI prints that one line and exits with 2. Any other exception is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message names the fix."""
