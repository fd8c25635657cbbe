"""Ablation sweeps: definitions (`experiments/sweeps/`), the runner and the collation of results.

  python -m experiments.sweep --sweep=digits_schedules [--dry-run] [--launch=local|tpu]
"""
