"""`python -m rlhflab …`: the same command as `rlhflab …` (what `accelerate launch -m rlhflab` runs)."""

from rlhflab.cli import app

if __name__ == "__main__":
    app()
