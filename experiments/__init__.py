"""Shell entry points, configs and the training loop for the paper's experiments.

Run ``python -m experiments.main --config experiments/configs/<name>.py
--workdir DIR``; see the README's experiment table for every config.
"""
