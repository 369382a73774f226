"""Preferences: a durable SQLite store of A/B comparisons, terminal labeling, import/export, AI judging."""

from rlhflab.prefs.store import Candidate, NewPair, PreferenceStore

__all__ = ["Candidate", "NewPair", "PreferenceStore"]
