"""User-facing errors: the CLI prints these as one line and exits with code 2 (no traceback)."""

import functools


class UserError(Exception):
    """Bad input from the user (file, key, line, spec). The message names it and says how to fix it."""


def user_errors(command):
    """CLI decorator: a UserError becomes `error: ...` in red on stderr and exit code 2, not a traceback."""
    import typer

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper
