"""bench/_common.py's run-loop teardown: every child stopped and the namespace deleted, however the block ends."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench._common as common


class FakeChildren:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.stopped = 0

    def stop_all(self) -> None:
        self.stopped += 1


@pytest.fixture
def deleted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(common, "delete_namespace", lambda namespace, url: calls.append(namespace))
    return calls


def test_a_block_that_ends_well_is_torn_down_quietly(tmp_path: Path, deleted: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    children = FakeChildren(tmp_path / "logs")
    with common.torn_down(children, "bench-x"):  # type: ignore[arg-type]
        pass
    assert children.stopped == 1 and deleted == ["bench-x"]
    assert "logs kept" not in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_sweep_is_torn_down_and_says_where_the_logs_are(tmp_path: Path, deleted: list[str],
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   error: BaseException) -> None:
    children = FakeChildren(tmp_path / "logs")
    with pytest.raises(type(error)), common.torn_down(children, "bench-x"):  # type: ignore[arg-type]
        raise error
    assert children.stopped == 1 and deleted == ["bench-x"]
    assert f"logs kept in {tmp_path / 'logs'}" in capsys.readouterr().err


def test_nested_points_say_where_the_logs_are_once(tmp_path: Path, deleted: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    children = FakeChildren(tmp_path / "logs")
    with (pytest.raises(RuntimeError), common.torn_down(children, "bench-x"),  # type: ignore[arg-type]
          common.torn_down(children, "bench-x-0", say_logs=False)):  # type: ignore[arg-type]
        raise RuntimeError("point failed")
    assert children.stopped == 2 and deleted == ["bench-x-0", "bench-x"]
    assert capsys.readouterr().err.count("logs kept in") == 1
