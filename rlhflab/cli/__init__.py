"""The `rlhflab` command (typer): `main` holds train/eval/report/…, `prefs` the preference commands."""

from rlhflab.cli.main import app

__all__ = ["app"]
