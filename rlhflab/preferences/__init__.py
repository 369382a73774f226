"""Preference pairs: the SQLite store, terminal labeling, import/export, and the AI judge."""
