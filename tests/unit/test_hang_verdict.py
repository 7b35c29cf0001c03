"""The watchdog's verdict on a hang (launcher/watchdog.py): from every rank's position,
which ranks did not arrive where the others wait, with their nodes; the same line
whichever rank decides it."""

from __future__ import annotations

import itertools

from launcher.progress import Position
from launcher.watchdog import Timeouts, decide

T0 = 1_000_000.0


def at(step: int, phase: str, since: float = T0) -> Position:
    return Position(step, phase, since)  # type: ignore[arg-type]


def test_a_rank_stuck_loading_its_batch_did_not_arrive_at_the_step_its_peer_waits_in():
    verdict = decide([at(5, "compute"), at(5, "data")], procs_per_node=2, timeouts=Timeouts(5))
    assert verdict == ("rank 1 (node 0, loading step 5's batch) did not arrive at step 5's forward/backward "
                       "within 5 s (train.hang_timeout)")


def test_a_rank_that_never_entered_the_collective_is_named_with_its_step():
    verdict = decide([at(5, "collective"), at(5, "compute"), at(5, "collective")], procs_per_node=1,
                     timeouts=Timeouts(600))
    assert verdict == ("rank 1 (node 1, computing step 5) did not arrive at step 5's loss collective "
                       "within 600 s (train.hang_timeout)")


def test_a_hang_in_the_optimizer_update_is_told_from_one_in_the_forward_and_backward():
    """The update has a phase of its own, after the loss collective: under ZeRO it gathers
    the updated weights, a collective every rank has arrived at."""
    verdict = decide([at(5, "update", T0), at(5, "update", T0 + 1)], procs_per_node=1, timeouts=Timeouts(600))
    assert verdict == ("all 2 ranks have been applying step 5's optimizer update for over 600 s "
                       "(train.hang_timeout); every rank arrived, so the hang is inside it (a collective or the engine)")
    assert decide([at(5, "update"), at(5, "compute")], procs_per_node=1, timeouts=Timeouts(600)).startswith(
        "rank 1 (node 1, computing step 5) did not arrive at step 5's optimizer update")


def test_an_earlier_step_is_behind_a_later_phase_of_none():
    """Step first, then the phase: a rank still writing step 4's checkpoint is behind one
    loading step 5's batch."""
    verdict = decide([at(5, "data"), at(4, "checkpoint")], procs_per_node=2, timeouts=Timeouts(60))
    assert verdict.startswith("rank 1 (node 0, writing step 4's checkpoint) did not arrive at step 5's data loading")


def test_ranks_behind_are_grouped_by_what_they_do_with_runs_of_ranks_and_their_nodes():
    positions = [at(7, "collective")] * 16
    positions[1] = positions[9] = at(7, "data")  # on nodes 0 and 2
    positions[12:16] = [None] * 4  # node 3 never started training
    verdict = decide(positions, procs_per_node=4, timeouts=Timeouts(60))
    assert verdict == ("ranks 1, 9 (nodes 0, 2, loading step 7's batch); 12-15 (node 3, not started training) "
                       "did not arrive at step 7's loss collective within 60 s (train.hang_timeout)")


def test_when_every_rank_is_in_the_same_phase_the_hang_is_inside_it():
    verdict = decide([at(3, "collective", T0), at(3, "collective", T0 + 2)], procs_per_node=1,
                     timeouts=Timeouts(5))
    assert verdict == ("all 2 ranks have been in step 3's loss collective for over 5 s (train.hang_timeout); "
                       "every rank arrived, so the hang is inside it (a collective or the engine)")


def test_the_start_and_the_end_of_training_are_covered():
    assert decide([at(1, "start"), None], procs_per_node=2, timeouts=Timeouts(600)).startswith(
        "rank 1 (node 0, not started training) did not arrive at the start of training")
    assert decide([at(9, "finish"), at(8, "checkpoint")], procs_per_node=1, timeouts=Timeouts(600)).startswith(
        "rank 1 (node 1, writing step 8's checkpoint) did not arrive at the end of training")


def test_the_start_is_timed_by_start_timeout_when_set_and_the_verdict_names_the_key():
    both_started = [at(1, "start")] * 2
    assert decide(both_started, procs_per_node=2, timeouts=Timeouts(60)).startswith(
        "all 2 ranks have been starting (engine start or resume) for over 60 s (train.hang_timeout)")
    assert decide(both_started, procs_per_node=2, timeouts=Timeouts(60, start=900)).startswith(
        "all 2 ranks have been starting (engine start or resume) for over 900 s (train.start_timeout)")
    # A step's phases keep hang_timeout.
    assert decide([at(2, "collective"), at(2, "data")], procs_per_node=2, timeouts=Timeouts(60, start=900)).endswith(
        "within 60 s (train.hang_timeout)")


def test_the_verdict_does_not_depend_on_when_each_rank_entered_its_phase():
    """Each rank decides when its own timeout is up, at a different moment: the line is
    the same, so the failure report says the same whichever rank it names."""
    verdicts = {decide([at(5, "collective", a), at(5, "data", b), at(5, "collective", c)], 3, Timeouts(5))
                for a, b, c in itertools.product([T0, T0 + 1], [T0 - 3, T0 + 4], [T0 + 0.5, T0 + 9])}
    assert len(verdicts) == 1
