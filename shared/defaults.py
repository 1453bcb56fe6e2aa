"""Defaults that the command line needs without importing numpy."""

DEFAULT_TRAINER = "fedmq.shared.trainer:MLPTrainer"
