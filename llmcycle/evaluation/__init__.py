"""Evaluation: the harness, metrics, the project's eval settings, comparisons and the success check."""
