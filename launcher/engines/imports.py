"""Importing an engine's library, without what a rank never uses.

Every rank imports torch and its engine's library before its first step: on a CPU host
that is most of a short run's time. Two things DeepSpeed imports cost seconds of CPU a
process and serve nothing dlaunch trains: MLflow (for DeepSpeed's autotuner) and
torch's inductor (for the ``@torch.compile`` functions of DeepSpeed's Muon optimizer).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from launcher.engines.base import Engine
from launcher.plan import LaunchPlan


def import_engine(plan: LaunchPlan) -> type[Engine]:
    """The engine class of ``plan``, with the library it drives imported."""
    if plan.training.engine.name == "deepspeed":
        import_deepspeed()
        from launcher.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    from launcher.engines.accelerate import AccelerateEngine

    return AccelerateEngine


def import_deepspeed() -> None:
    # DeepSpeed's autotuner imports MLflow when it is installed, for its own logging,
    # which dlaunch does not use: a second of start-up on every rank. MLflow stays
    # importable for the MLflow sink.
    with hidden_module("mlflow"):
        import deepspeed  # noqa: F401
    # ZeRO imports the Muon module at its first step, to check the optimizer's type, and
    # building its three @torch.compile functions imports inductor: 2 s of CPU a rank on
    # this project's 2-core machine, for functions only a Muon optimizer calls. Imported
    # here, they are built at their first call instead (and compile as before then).
    with deferred_torch_compile():
        import deepspeed.runtime.zero.muon.original_muon  # noqa: F401


@contextlib.contextmanager
def hidden_module(name: str) -> Iterator[None]:
    """Within the block, ``import name`` fails as if the module were not installed
    (unless it is imported already); after it, the module imports as usual."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not found"
    try:
        yield
    finally:
        if sys.modules.get(name, ...) is None:
            del sys.modules[name]


@contextlib.contextmanager
def deferred_torch_compile() -> Iterator[None]:
    """Within the block, ``torch.compile(fn, ...)`` (and ``@torch.compile(...)``) return a
    function that calls ``torch.compile(fn, ...)`` at its first call and the compiled
    function from then on. torch.compile compiles at the first call anyway: only the
    import of its backend moves."""
    compile_now = torch.compile

    def compile_later(model: Callable | None = None, **options: Any) -> Callable:
        if model is None:  # @torch.compile(...): a decorator
            return lambda fn: compile_later(fn, **options)
        compiled: Callable | None = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = compile_later  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = compile_now
