"""Sparse pre-training plugin for trainer-plugins: gradual pruning schedules (schedule.py), exact
magnitude pruning that keeps pruned weights at zero (pruning.py), the scaling-law fit (scaling.py)."""

__version__ = "0.1.0"
