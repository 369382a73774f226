"""A run directory's files: checkpoints (atomic, resumable) and the metric/sample logs with trackers."""
