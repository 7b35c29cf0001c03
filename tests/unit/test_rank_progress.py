"""A rank's progress file: rewritten in place, read back as the last line written."""

from __future__ import annotations

from launcher.progress import RankProgress, read_position
from launcher.rundir import rank_progress


def test_the_last_mark_is_what_a_peer_reads_even_when_shorter_than_the_one_before(tmp_path):
    (tmp_path / "logs").mkdir()
    progress = RankProgress(tmp_path, 3)
    progress.mark(123456, "checkpoint")
    progress.mark(7, "data")
    position = read_position(tmp_path, 3)
    assert (position.step, position.phase) == (7, "data")
    assert position == progress.position._replace(since=position.since)
    assert rank_progress(tmp_path, 3).read_text().split() == ["7", "data"]


def test_a_cleared_rank_reads_as_not_started_until_it_marks_again(tmp_path):
    (tmp_path / "logs").mkdir()
    progress = RankProgress(tmp_path, 0)
    progress.mark(5, "collective")
    progress.clear()
    assert read_position(tmp_path, 0) is None and progress.position is None
    progress.mark(6, "compute")
    assert read_position(tmp_path, 0).order() == (6, 2)
