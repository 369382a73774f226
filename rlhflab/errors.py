"""User-facing errors: the CLI prints these as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """Bad input from the user (file, key, line, spec). The message names it and says how to fix it."""
