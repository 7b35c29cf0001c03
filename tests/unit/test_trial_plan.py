"""A sweep trial's plan (cluster/tune.py, on a Ray worker): the sweep's recipe with the
trial's values, and the thread settings of the shell `dlaunch sweep` ran in, which the
sweep directory carries to it."""

from __future__ import annotations

import json

from cluster.tune import SETTINGS, plan_trial
from launcher.cli import _create_sweep_dir
from launcher.data.facts import describe
from launcher.host import detect_host
from launcher.plan import build_plan
from launcher.recipe import load_recipe

RECIPE = """
name: trial
model: {name: mlp, kwargs: {hidden: [16]}}
data: {source: synthetic, samples: 200, num_features: 8, num_classes: 3}
"""


def test_a_trial_is_planned_with_its_values_and_the_sweep_shells_thread_settings(tmp_path, monkeypatch):
    (tmp_path / "sweep.yaml").write_text(RECIPE)
    recipe, _ = load_recipe(tmp_path / "sweep.yaml", [])
    probe = build_plan(recipe, host=detect_host(), data=describe(recipe.data), run_dir=str(tmp_path / "probe"),
                       backend="ray", nodes=2, procs_per_node=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("HOME", "/home/someone")
    sweep = tmp_path / "sweep"
    _create_sweep_dir(sweep, recipe, [probe])
    settings = json.loads((sweep / SETTINGS).read_text())
    assert settings["user_env"] == {"OMP_NUM_THREADS": "3"}  # the tunables only

    plan = plan_trial(sweep, settings, ["optim.lr=0.5"], sweep / "trials" / "t0")
    assert plan.recipe.optim.lr == 0.5 and plan.topology.nodes == 2
    assert plan.env["OMP_NUM_THREADS"] == "3"
    # A sweep directory of an older version has none: the Ray worker's CPUs.
    del settings["user_env"]
    assert plan_trial(sweep, settings, [], sweep / "trials" / "t1").env["OMP_NUM_THREADS"] == "1"
