"""Optimizer and schedule, the train/eval step, checkpoints, preemption signals, metrics and
loggers; knows nothing of architecture details."""
