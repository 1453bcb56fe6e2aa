"""How much memory the aggregator needs, as a multiple of the model's size, per strategy.

The multiples are the peaks of anonymous memory ``bench/large_model.py`` measured (sync FedAvg,
2.2-2.6 x the model at 100M-250M parameters, flat in the number of workers: updates go to spill
files and are averaged block by block) rounded up, plus the updates a strategy holds at once.
:func:`fedmq.shared.memory.check_fits` refuses a model whose need is over the budget.
"""

from __future__ import annotations

from fedmq.aggregator.config import AggregatorConfig

#: the model, the version being published (its encoded pieces stay until confirmed), the new average
BASE_FACTOR = 4.0


def memory_factor(cfg: AggregatorConfig) -> tuple[float, str]:
    """(multiple of the model's size, what it counts) for this configuration."""
    factor, why = BASE_FACTOR, "the model, the version being published and the new average"
    rule = cfg.robust_rule()
    if cfg.synchronous and rule.needs_all:
        held = cfg.workers_per_round or cfg.min_workers
        factor += held
        why += f", and the {held} updates of a round that {rule.options} compares"
    elif not cfg.synchronous and rule.needs_all:
        factor += cfg.buffer_size
        why += f", and the {cfg.buffer_size} updates of a buffer that {rule.options} compares"
    elif not cfg.synchronous:
        factor += 1
        why += ", and the update being applied"
    return factor, why
