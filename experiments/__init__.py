"""The experiments: training (``train_moe``), benchmarks and cross-framework comparison, run from the repo root.

A package so that the training files import each other as ``experiments.<module>``:
``python -m experiments.train_moe`` (or ``python experiments/train_moe.py``, which re-runs itself that way).
"""
