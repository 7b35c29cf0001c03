"""User models named by import path, ``package.module:factory`` (torchtune's ``_component_``).

The module is looked up with the working directory on ``sys.path``, as ``python -m`` does,
so a recipe next to its ``mymodels.py`` works without installing anything. This module
imports no torch: the planner calls ``check_target_importable`` on a login node.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from launcher.errors import UsageError

KEY = "model.target"


def _split(target: str) -> tuple[str, str]:
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise UsageError(f"{target!r} is not an import path; write package.module:factory", key=KEY)
    return module, attr


@contextmanager
def _cwd_on_path() -> Iterator[str]:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    # A module written after the interpreter started (a test, a notebook) is invisible
    # to the cached directory listings of the path finders until they are dropped.
    importlib.invalidate_caches()
    try:
        yield cwd
    finally:
        if added:
            sys.path.remove(cwd)


def check_target_importable(target: str) -> None:
    """Raise a UsageError unless ``target``'s module can be found; the module is not run.

    (For a dotted name, Python imports the parent packages to find the submodule.)
    """
    module, _ = _split(target)
    with _cwd_on_path() as cwd:
        try:
            spec = importlib.util.find_spec(module)
        except ImportError as exc:  # a parent package is missing or is not a package
            raise UsageError(f"cannot find module {module!r}: {exc}", key=KEY) from None
    if spec is None:
        raise UsageError(f"cannot find module {module!r} in the working directory {cwd} "
                         f"or the installed packages", key=KEY)


def load_target(target: str) -> Callable[..., Any]:
    """Import ``target``'s module and return its factory."""
    module_name, attr = _split(target)
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except (ImportError, SyntaxError) as exc:
            raise UsageError(f"cannot import {module_name!r}: {exc}", key=KEY) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}", key=KEY)
    if not callable(factory):
        raise UsageError(f"{target!r} is a {type(factory).__name__}, not a callable factory", key=KEY)
    return factory
