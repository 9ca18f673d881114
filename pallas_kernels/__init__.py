"""Pallas kernels for the adder (l1) reductions."""
