"""Speed benchmarks (``python -m experiments.benchmarks.<name>``).

Each prints ratios measured in one process, on the machine at hand.
"""
