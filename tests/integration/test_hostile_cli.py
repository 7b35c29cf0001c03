"""Hostile recipes and overrides through the real `dlaunch run`: exit code 2, one line on
stderr that starts with `error:`, no traceback, no run directory, and nothing the
document asked for done (the fuzzer, tests/unit/test_recipe_fuzz.py, covers the loader
in-process; this is the same promise seen from a shell)."""

from __future__ import annotations

import pytest

from tests.conftest import dlaunch

pytestmark = pytest.mark.integration

LAUGHS = "model:\n  kwargs:\n    l0: &l0 [lol]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))


@pytest.mark.parametrize("document,overrides,expected", [
    (LAUGHS, [], "error: bad.yaml (line 8): YAML document refused: more than 100000 values"),
    ("model:\n  kwargs:\n    x: " + "[" * 100_000 + "\n", [], "error: bad.yaml (line 3): YAML document refused: "
                                                              "nested more than 64 levels deep"),
    ("name: !!python/object/apply:os.system ['touch pwned']\n", [], "error: bad.yaml (line 1): YAML syntax error: "
                                                                   "could not determine a constructor"),
    ("optim:\n  lr: 1e999\n", [], "error: optim.lr (line 2): inf is not a finite number"),
    ("name: ok\x00\n", [], "error: bad.yaml (line 1): YAML syntax error: character U+0000 is not allowed"),
    ("{}\n", ["optim.l\x1b[2Jr=1"], "error: optim.l\\x1b[2Jr (--set): unknown key"),
    ("{}\n", ["data.path=" + "x" * 300, "data.source=parquet"], "error: data.path (--set): cannot read 'xxx"),
], ids=["billion-laughs", "deep", "python-tag", "inf", "nul", "escape-in-key", "name-too-long"])
def test_a_hostile_recipe_is_one_error_line_and_leaves_nothing(tmp_path, document, overrides, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(document.encode())
    runs = tmp_path / "runs"
    sets = [arg for spec in overrides for arg in ("--set", spec)]
    result = dlaunch("run", str(recipe), "--set", f"logging.run_root={runs}", *sets, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(expected), line
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not runs.exists(), "a run dir was begun"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], "the document made something happen"
