"""What the sinks are given: the recipe flattened to dotted keys, cut to MLflow's limits;
where MLflow keeps a run and how its status follows the run (a real SQLite store); the
refusal of a sink whose library is not installed."""

from __future__ import annotations

import json
import sys

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

from launcher.cli import main
from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.plan import HostFacts, build_plan
from launcher.recipe import Recipe, load_recipe
from launcher.sinks import as_text, check_installed, flatten, hyperparameters
from launcher.sinks.mlflow import MlflowSink, local_store, mlflow_params, sqlite_artifact_root

DATA = DataFacts(num_rows=640, num_train=512, num_val=128, input_shape=(16,), num_classes=4)


def test_nested_mappings_flatten_to_dotted_keys_and_other_values_stay():
    tree = {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "model": {"kwargs": {"hidden": [64, 64]}},
            "engine": {"deepspeed_config": {}}, "sweep": None, "name": "run"}
    assert flatten(tree) == {"optim.lr": 1e-3, "optim.betas": [0.9, 0.95], "model.kwargs.hidden": [64, 64],
                             "engine.deepspeed_config": {}, "sweep": None, "name": "run"}


def test_a_list_of_mappings_stays_one_value():
    assert flatten({"a": {"b": [{"c": 1}]}}) == {"a.b": [{"c": 1}]}


def test_the_whole_recipe_flattens_to_every_key_once():
    flat = flatten(Recipe().model_dump(mode="json"))
    assert flat["optim.lr"] == Recipe().optim.lr and flat["logging.mlflow.enabled"] is False
    assert flat["alerts.nonfinite.policy"] == "stop"
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_values_become_text_as_recipe_yaml_spells_them():
    assert [as_text(v) for v in ("adamw", 0.001, 16, True, None, [64, 64], {})] == \
        ["adamw", "0.001", "16", "true", "null", "[64, 64]", "{}"]


def test_mlflow_params_are_cut_to_mlflows_limits():
    long_value, long_key = "x" * (MAX_PARAM_VAL_LENGTH + 10), "k" * (MAX_ENTITY_KEY_LENGTH + 10)
    [short, cut, cut_key] = mlflow_params({"optim.lr": 0.001, "model.kwargs.note": long_value, long_key: 1})
    assert (short.key, short.value) == ("optim.lr", "0.001")
    assert len(cut.value) == MAX_PARAM_VAL_LENGTH and cut.value.endswith("x...")
    assert len(cut_key.key) == MAX_ENTITY_KEY_LENGTH and cut_key.key.endswith("k...")


def test_hyperparameters_add_what_the_planner_derived():
    recipe = Recipe.model_validate({"train": {"micro_batch_size": 16, "grad_accum": 2},
                                    "optim": {"lr": 1e-3, "reference_batch": 32, "scaling": "linear"}})
    plan = build_plan(recipe, host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=DATA,
                      run_dir="/runs/r", nodes=1, procs_per_node=2)
    params = hyperparameters(plan)
    assert params["train.grad_accum"] == 2 and params["plan.world_size"] == 2
    assert params["plan.global_batch"] == 64 and params["plan.lr"] == pytest.approx(2e-3)


def test_mlflow_stores_default_to_sqlite_with_artifacts_beside_the_database(tmp_path):
    assert local_store(tmp_path / "runs") == f"sqlite:///{tmp_path}/runs/mlruns/mlflow.db"
    assert sqlite_artifact_root(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "artifacts").as_uri()
    assert sqlite_artifact_root("http://tracking:5000") is None
    assert sqlite_artifact_root("sqlite://") is None


def mlflow_plan(tmp_path, **mlflow):
    recipe = Recipe.model_validate({"name": "exp", "logging": {"run_root": str(tmp_path / "runs"),
                                                               "mlflow": {"enabled": True, **mlflow}}})
    run_dir = tmp_path / "runs" / "exp-1"
    run_dir.mkdir(parents=True, exist_ok=True)
    return build_plan(recipe, host=HostFacts(has_cuda=False, cpus=2, hostname="h"), data=DATA,
                      run_dir=str(run_dir), nodes=1, procs_per_node=1)


def test_an_mlflow_run_ends_killed_when_preempted_and_its_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plan = mlflow_plan(tmp_path)  # no tracking URI: the SQLite store under the run root
    client = MlflowClient(tracking_uri=local_store(tmp_path / "runs"))

    first = MlflowSink(plan)
    first.start({"optim.lr": 0.001}, "name: exp\n")
    first.write("train", 10, {"loss": 1.5, "lr": 0.001, "skipped": None, "flag": True})
    first.close("preempted")
    run_id = json.loads((tmp_path / "runs" / "exp-1" / "mlflow.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = MlflowSink(plan)
    resumed.start({"optim.lr": 0.001}, "name: exp\n")
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.write("train", 20, {"loss": 0.5})
    resumed.close("failed")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and set(run.data.metrics) == {"train/loss", "train/lr"}
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [10, 20]
    assert client.get_experiment_by_name("exp").artifact_location == \
        (tmp_path / "runs" / "mlruns" / "artifacts").as_uri()


def test_mlflow_tracking_uri_in_the_environment_is_used_when_the_recipe_names_none(tmp_path, monkeypatch):
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    sink = MlflowSink(mlflow_plan(tmp_path, experiment="from-env"))
    sink.start({}, "")
    sink.close("finished")
    client = MlflowClient(tracking_uri=elsewhere)
    [run] = client.search_runs([client.get_experiment_by_name("from-env").experiment_id])
    assert run.info.status == "FINISHED" and not (tmp_path / "runs" / "mlruns").exists()


@pytest.mark.parametrize("sink", ["mlflow", "wandb"])
def test_an_enabled_sink_that_is_not_installed_is_refused_naming_the_extra(tmp_path, monkeypatch, capsys, sink):
    monkeypatch.setitem(sys.modules, sink, None)  # how Python marks a module as not importable
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {{source: synthetic}}\nlogging:\n  {sink}:\n    enabled: true\n")
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err == (f"error: logging.{sink}.enabled (line 4): {sink} is not installed; "
                                       f"install dlaunch's {sink} extra: pip install 'dlaunch[{sink}]'\n")
    check_installed(Recipe().logging)  # nothing enabled, nothing needed


def test_a_tracking_uri_with_a_password_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("logging:\n  mlflow:\n    tracking_uri: https://me:secret@mlflow.example\n")
    with pytest.raises(UsageError) as info:
        load_recipe(recipe)
    assert str(info.value) == ("error: logging.mlflow.tracking_uri (line 3): a password here would be written to "
                               "recipe.yaml and plan.json; give it in MLFLOW_TRACKING_PASSWORD instead")
