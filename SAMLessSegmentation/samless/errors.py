"""The one exception type the core raises for anything a user can fix."""


class SamlessError(Exception):
    """A problem with the user's input, model or output paths.

    The message says what was wrong and what to do; the command line prints it as one line.
    """
