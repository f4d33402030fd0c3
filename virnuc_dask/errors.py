"""The one exception type for errors a user can cause and fix."""


class VirnucError(Exception):
    """A problem with the user's input, files or settings, with a message that says the fix.

    The command line prints the message without a traceback and exits with status 2.
    Programming errors are never wrapped in this type.
    """
