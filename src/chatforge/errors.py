"""User-facing errors: the CLI prints the message on one line and exits 2 (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a missing path, an unknown config key, an existing run, ...

    The message must name the problem and say what to do.
    """
