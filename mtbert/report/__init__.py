"""Reporting: reporter.py (a run's metrics.jsonl, console and W&B) and the comparisons of finished
runs: runs.py (a run directory as they read it), compare.py, seed_groups.py, stats.py,
analysis.py, quality.py. Nothing here imports the trainer."""
