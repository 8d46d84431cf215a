"""Hyperparameter presets: flagfiles <name>.cfg, read by common/presets.py."""
