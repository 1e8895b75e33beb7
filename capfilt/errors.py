"""The user's mistakes, told apart from capfilt's bugs.

A ``UserError`` (a missing shard, an unknown config key, a model reference that names no model) says
in its message what to fix; the CLI prints that one line and exits with 2. Any other exception is a
bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message names the fix."""


def last_line(error: str) -> str:
    """The line that ends an error report (a traceback's or Ray's: the exception itself), without
    terminal colours; "" for an empty one."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", error).splitlines() if line.strip()]
    return lines[-1] if lines else ""
