"""Defaults that the command line needs without importing numpy."""

DEFAULT_TRAINER = "fedmq.shared.trainer:MLPTrainer"
#: the attacks `fedmq worker --attack` can mount (fedmq.worker.attack)
ATTACK_KINDS = ("sign-flip", "scale", "gauss", "label-flip")
DEFAULT_ATTACK_SCALE = 10.0
