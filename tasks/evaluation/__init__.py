"""Evaluation on the held-out test split: metrics (local `evaluate` modules), baselines, scoring, the report."""
