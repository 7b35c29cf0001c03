"""Which signal has rank 0 requeue its Slurm job after the preemption checkpoint: the
preemption signal, and SIGTERM only when that is the one the recipe names (scancel sends
SIGTERM too, and Slurm would requeue a cancelled job). `scontrol` is a stand-in that
notes its arguments: what is tested is whether the requeue is asked for."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from launcher import preemption


@pytest.mark.parametrize("preemption_signal,received,requeued", [
    ("USR2", signal.SIGUSR2, True),
    ("USR2", signal.SIGTERM, False),
    ("TERM", signal.SIGTERM, True),
])
def test_only_the_preemption_signal_requeues(tmp_path, monkeypatch, preemption_signal, received, requeued):
    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv(preemption.REQUEUE_VAR, "1")
    monkeypatch.setenv(preemption.SIGNAL_VAR, preemption_signal)
    monkeypatch.setattr(preemption, "requested", False)
    monkeypatch.setattr(preemption, "ending", False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        preemption.install()
        os.kill(os.getpid(), received)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert preemption.requested
    assert preemption.requeue() is requeued
    assert (calls.read_text() if calls.exists() else "") == ("requeue 42\n" if requeued else "")
