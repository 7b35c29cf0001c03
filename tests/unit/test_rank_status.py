"""A rank's status file: written whole, and without waiting for the disk.

The stop handler writes `terminated: SIGTERM` inside the agent's grace before SIGKILL.
A CI run once saw a rank outlast that grace and keep `running`; the one wait in the
handler that depends on anything outside the rank is an fsync, which queues behind
whatever else the disk has to write (another test's checkpoint)."""

from __future__ import annotations

import os

import pytest

from launcher.rundir import rank_status
from launcher.worker import write_status


def test_a_status_replaces_the_last_one_whole_and_never_waits_for_an_fsync(tmp_path, monkeypatch):
    (tmp_path / "logs").mkdir()
    write_status(tmp_path, 3, "running")

    def fsync(fd: int) -> None:
        pytest.fail("a status write waited for an fsync")

    monkeypatch.setattr(os, "fsync", fsync)
    write_status(tmp_path, 3, "terminated: SIGTERM")
    assert rank_status(tmp_path, 3).read_text() == "terminated: SIGTERM\n"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [rank_status(tmp_path, 3).name]
