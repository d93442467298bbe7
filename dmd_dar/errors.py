"""The single exception type for bad user input: its message names the problem and the fix."""


class UserError(Exception):
    """Bad input from the user (a path, a config key, a file). The CLI prints it as one line and exits 2."""
