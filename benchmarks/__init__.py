"""Speed and memory of our optimizers beside their peers, measured in one run.

Run ``python -m benchmarks``.
"""
