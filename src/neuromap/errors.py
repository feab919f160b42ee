"""One exception type for user mistakes.

The CLI prints a ``NeuroMapError`` as a plain message and exits with code 2; any other exception is a bug
and keeps its traceback.
"""


class NeuroMapError(Exception):
    """A problem with the user's input or request: the message names the file, what is wrong and the fix."""
