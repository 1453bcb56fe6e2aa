"""Defaults that the command line needs without importing numpy."""

DEFAULT_TRAINER = "shared.trainer:MLPTrainer"
