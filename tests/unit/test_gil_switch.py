"""The aggregator shortens the GIL switch interval so that its main loop gets the GIL back
soon after each blocking call while the broker client's I/O thread is busy. No broker."""

from __future__ import annotations

import sys

from fedmq.aggregator.service import GIL_SWITCH_S, shorten_gil_switch


def test_the_switch_interval_is_lowered_never_raised() -> None:
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # Python's default
        assert shorten_gil_switch() == GIL_SWITCH_S == sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_S / 2)  # someone chose shorter: kept
        assert shorten_gil_switch() == GIL_SWITCH_S / 2
    finally:
        sys.setswitchinterval(before)
