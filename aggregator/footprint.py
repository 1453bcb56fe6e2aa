"""How much memory the aggregator needs, as a multiple of the model's size, per strategy.

The multiples are the peaks of anonymous memory ``bench/large_model.py`` measured (sync FedAvg,
2.2-2.6 x the model at 100M-250M parameters, flat in the number of workers: updates go to spill
files and are averaged block by block) rounded up, plus the updates a strategy holds at once.
:func:`fedmq.shared.memory.check_fits` refuses a model whose need is over the budget. Smaller
models put up to two chunked updates together in memory instead, and only in the room the budget
leaves beyond that need (:func:`updates_in_memory_bytes`): the multiples stay what must fit.
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


#: from this size on (64M float32 parameters) an update is always put together in a spill file:
#: issue 11's models (100M-250M parameters), where the aggregator must stay ~2.2-2.7 x the model
SPILL_ALWAYS_BYTES = 256 * 1024 * 1024
#: chunked updates held in memory at once, at most (the rest go to spill files): with the model,
#: the new average, FedBuff's accumulator and a model being published, the (K + 4) x model goal
UPDATES_IN_MEMORY = 2


def updates_in_memory_bytes(model_bytes: int, update_bytes: int, factor: float, budget: int | None, *,
                            auto: bool) -> int:
    """How many bytes of chunked updates the aggregator may put together in memory at once.

    A chunked update (over ``--chunk-bytes``) is put together in ONE buffer. In memory that
    costs a copy (~1.5 ms per 10 MB); in a spill file under ``--out``/spill (a file-backed map
    whose pages go back to the page cache as soon as they are hashed) about ten times that
    (~14 ms per 10 MB: page-cache pages are allocated, dirtied and dropped), which on a
    CPU-bound aggregator is a slower round. So updates go to memory while it is cheap to:

    * never for a model of :data:`SPILL_ALWAYS_BYTES` or more: there memory, not CPU, is the
      limit, and spilling keeps the aggregator near 2-3 x the model whatever the workers;
    * at most :data:`UPDATES_IN_MEMORY` updates at once (an update that arrives while they are
      held goes to a spill file: a sync round of many workers spills all but two);
    * and only in the room the budget leaves beyond ``factor`` x the model (what
      :func:`memory_factor` counts, with updates spilled): all of an explicit ``--memory-budget``,
      half of an ``auto`` one (what the machine has free now: other processes need some).

    ``budget``: bytes, None when there is none (``off``). Returns 0 when every update spills.
    """
    if model_bytes >= SPILL_ALWAYS_BYTES or update_bytes <= 0:
        return 0
    room = UPDATES_IN_MEMORY * update_bytes
    if budget is not None:
        spare = (budget // 2 if auto else budget) - int(factor * model_bytes)
        room = min(room, spare // update_bytes * update_bytes)
    return max(0, room)
