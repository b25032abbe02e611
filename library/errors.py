"""The project's error type: raised for bad user input, printed as one line without a traceback."""


class AnimaError(Exception):
    """A problem with the user's input (file, flag, config) whose message says what to fix."""
