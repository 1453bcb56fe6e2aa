"""The memory budget: a model too big for a process is refused before the run, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.footprint import (
    BASE_FACTOR,
    SPILL_ALWAYS_BYTES,
    UPDATES_IN_MEMORY,
    memory_factor,
    updates_in_memory_bytes,
)
from fedmq.cli import main
from fedmq.shared import memory
from fedmq.shared.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("auto", "auto"), ("off", "off"), (None, "auto"), ("8G", 8 * 1024**3), ("512M", 512 * 1024**2),
    ("1.5g", int(1.5 * 1024**3)), ("1048576", 1048576), ("64KiB", 64 * 1024), (4096, 4096),
])
def test_parse_budget(text: object, expected: object) -> None:
    assert memory.parse_budget(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "8X", "1e9"])
def test_parse_budget_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory-budget"):
        memory.parse_budget(text)


def test_check_fits_names_sizes_and_option() -> None:
    memory.check_fits(100, 4, 400, who="aggregator", why="w")  # exactly at the budget: fits
    with pytest.raises(ConfigError) as err:
        memory.check_fits(1024**3, 4, 2 * 1024**3, who="aggregator", why="the model and its average")
    text = str(err.value)
    assert "\n" not in text
    for needle in ("1.00 GiB", "4.00 GiB", "2.00 GiB", "4 x the model", "--memory-budget", "aggregator"):
        assert needle in text
    memory.check_fits(1024**5, 4, "off", who="aggregator", why="w")  # off: no check


def test_auto_budget_is_what_this_machine_has() -> None:
    have = memory.available_bytes()
    assert have is not None and have > 0  # Linux: /proc/meminfo
    memory.check_fits(1024, 4, "auto", who="worker", why="w")
    with pytest.raises(ConfigError, match="the memory available to it now"):
        memory.check_fits(have, 4, "auto", who="worker", why="w")


def test_factor_grows_with_what_a_strategy_holds() -> None:
    sync = memory_factor(AggregatorConfig(test_data="t", out="r"))[0]
    assert sync == BASE_FACTOR  # updates go to spill files, averaged block by block
    buff = memory_factor(AggregatorConfig(test_data="t", out="r", mode="async", strategy="fedbuff"))[0]
    krum = memory_factor(AggregatorConfig(test_data="t", out="r", mode="async", strategy="fedbuff", buffer_size=5,
                                          robust="multi-krum"))[0]
    assert sync < buff < krum == BASE_FACTOR + 5


def test_aggregator_refuses_a_model_over_its_budget_in_one_line(tmp_path: Path) -> None:
    """Before it connects to anything: no broker is needed to say the model cannot fit."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", X=rng.random((20, 64), dtype=np.float32), y=np.arange(20) % 10)
    # 64 -> 1000 -> 10: 75,010 parameters, 300 kB; 4 x that is over 1 MiB
    result = CliRunner().invoke(main, ["aggregator", "--test-data", str(tmp_path / "test.npz"), "--out",
                                       str(tmp_path / "run"), "--hidden", "1000", "--memory-budget", "1M",
                                       "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1, result.output
    assert "too big for the aggregator's memory" in result.output and "--memory-budget" in result.output


MiB = 1024 * 1024


def test_chunked_updates_go_to_memory_only_while_cheap_and_within_the_budget() -> None:
    """Spill files cost ~10x a copy in memory: used only for very large models, beyond
    UPDATES_IN_MEMORY updates at once, or where the budget leaves no room for them."""
    model, update = 40 * MiB, 41 * MiB
    assert updates_in_memory_bytes(model, update, 5, None, auto=False) == UPDATES_IN_MEMORY * update
    # issue 11's models: always spilled, whatever the budget
    assert updates_in_memory_bytes(SPILL_ALWAYS_BYTES, SPILL_ALWAYS_BYTES, 5, None, auto=False) == 0
    assert updates_in_memory_bytes(SPILL_ALWAYS_BYTES - 1, SPILL_ALWAYS_BYTES, 5, 1 << 50, auto=False) > 0
    # an explicit budget: the room beyond factor x the model, in whole updates
    assert updates_in_memory_bytes(model, update, 5, 5 * model + update + 1, auto=False) == update
    assert updates_in_memory_bytes(model, update, 5, 5 * model + update - 1, auto=False) == 0
    assert updates_in_memory_bytes(model, update, 5, 4 * model, auto=False) == 0  # (check_fits refuses this)
    # auto: half of what the machine has free is left to the rest of it
    assert updates_in_memory_bytes(model, update, 5, 2 * (5 * model + update), auto=True) == update
    assert updates_in_memory_bytes(model, update, 5, 5 * model + update, auto=False) == update


_ROUNDS_OF_LARGE_ARRAYS = """
import resource, sys
import numpy as np
from fedmq.shared import memory
if sys.argv[1] == "keep":
    assert memory.keep_large_buffers() is True  # Linux with glibc, as in CI and the image
def round_faults():  # four 40 MB arrays (10M float32 parameters), as a round's decoded updates
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [np.ones(10_000_000, np.float32) for _ in range(4)]
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
round_faults()
print(round_faults())
"""


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_a_round_of_large_arrays_reuses_the_last_rounds_memory(mode: str) -> None:
    # glibc's default gives every buffer over 32 MiB its own map and unmaps it when freed: each
    # round faults its memory in again (kernel time; far more where a VM's host reclaims freed
    # pages). The aggregator and the workers keep freed buffers for the next round.
    out = subprocess.run([sys.executable, "-c", _ROUNDS_OF_LARGE_ARRAYS, mode], capture_output=True, text=True,
                         timeout=60, check=True)
    faults = int(out.stdout.strip())
    if mode == "keep":
        assert faults < 64, f"the second round faulted {faults} pages in again"
    else:  # the default the fix is for: the test above would fail without keep_large_buffers
        assert faults >= 64


class _Pub:
    def __init__(self, done: bool, error: Exception | None = None) -> None:
        self.done, self.error = done, error

    def wait(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


def test_a_confirmed_publish_is_let_go_before_the_checkpoint() -> None:
    """A model's encoded bytes (a model's size) are held until confirmed, not until the next
    checkpoint; one not confirmed yet, or failed with a retryable error, is kept for it."""
    from types import SimpleNamespace

    from fedmq.aggregator.service import Aggregator
    from fedmq.shared.errors import NotConfirmed

    pending, retry = _Pub(False), _Pub(True, NotConfirmed("later"))
    agg = SimpleNamespace(_unconfirmed=[_Pub(True), pending, retry, _Pub(True)])
    Aggregator._raise_refused_publishes(agg)  # type: ignore[arg-type]
    assert agg._unconfirmed == [pending, retry]


def test_a_model_made_ahead_is_handed_over_or_its_error_raised_on_the_callers_thread() -> None:
    """A sync round's next model is made on another thread while the checkpoint is written
    (``_Ahead``); what it made, or what it raised (a model that is not finite), reaches the
    thread that publishes, as if it had made it there."""
    import threading

    from fedmq.aggregator.service import _Ahead

    made_on: list[str] = []

    def make() -> str:
        made_on.append(threading.current_thread().name)
        return "body"

    assert _Ahead(make, name="fedmq-model-ahead").result() == "body" and made_on == ["fedmq-model-ahead"]

    def broken() -> str:
        raise ValueError("dense_0/W holds values that are not finite (inf or nan)")

    with pytest.raises(ValueError, match="not finite"):
        _Ahead(broken).result()
