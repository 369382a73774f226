"""User-facing errors: the CLI prints these as one line and exits with code 2 (no traceback); stops and
non-finite aborts likewise, with their own codes."""

import functools


class UserError(Exception):
    """Bad input from the user (file, key, line, spec). The message names it and says how to fix it."""


class Stopped(Exception):
    """A job stopped on request (SIGTERM, Ctrl-C) after saving its work: `what` happened, `how` to continue.
    A job that runs others (a sweep, the RLHF loop) re-raises with its own `how`."""

    def __init__(self, what: str, exit_code: int, how: str):
        super().__init__(f"{what}; {how}")
        self.what, self.exit_code, self.how = what, exit_code, how


class NonFiniteAbort(Exception):
    """Training gave up: NaN/inf left nothing to learn from for too long. The message (one line) names the cause,
    where the work was saved and how to continue; the CLI exits with code 3."""

    exit_code = 3


def user_errors(command):
    """CLI decorator: a UserError becomes `error: ...` in red on stderr and exit code 2, not a traceback; a
    Stopped job prints its one line and exits with its signal's code (130 / 143); so does a second Ctrl-C; a
    NonFiniteAbort prints its one line and exits 3."""
    import typer

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        except NonFiniteAbort as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(e.exit_code) from None
        except Stopped as e:
            typer.secho(str(e), fg="yellow", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("aborted", fg="red", err=True)
            raise typer.Exit(130) from None

    return wrapper
