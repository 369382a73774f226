"""What changed: probe evaluation, health alarms, run reports and comparisons."""
