"""The two import tricks of launcher/engines/imports.py. torch.compile is replaced by a
recorder: what is tested is when, and with what, it is called."""

from __future__ import annotations

import sys

import pytest
import torch

from launcher.engines.imports import deferred_torch_compile, hidden_module


@pytest.fixture
def compile_calls(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    def recording_compile(model, **options):
        calls.append((model, options))
        return lambda *args: ("compiled", model(*args))

    monkeypatch.setattr(torch, "compile", recording_compile)
    return calls


def test_a_function_compiled_in_the_block_is_compiled_at_its_first_call_with_its_options(compile_calls):
    with deferred_torch_compile():
        @torch.compile(dynamic=False)
        def double(x):
            return 2 * x

        triple = torch.compile(lambda x: 3 * x)
    assert compile_calls == []
    assert double.__name__ == "double"
    assert double(5) == ("compiled", 10) and double(6) == ("compiled", 12)
    assert triple(1) == ("compiled", 3)
    assert [options for _, options in compile_calls] == [{"dynamic": False}, {}]


def test_torch_compile_is_itself_again_after_the_block(compile_calls):
    before = torch.compile
    with pytest.raises(RuntimeError), deferred_torch_compile():
        raise RuntimeError("an import failed")
    assert torch.compile is before
    torch.compile(abs)
    assert len(compile_calls) == 1


def test_a_hidden_module_fails_to_import_in_the_block_and_imports_after_it():
    name = "json.tool"  # in the standard library, and not imported by the test run
    assert name not in sys.modules
    with hidden_module(name):
        with pytest.raises(ImportError):
            import json.tool  # noqa: F401
    import json.tool  # noqa: F401, F811

    assert sys.modules[name] is not None
