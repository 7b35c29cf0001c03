"""Real training runs logged to every sink at once, each read back through its own reader:
MLflow's client, W&B's offline-run inspector, TensorBoard's event accumulator, and
metrics.jsonl. A run that a stop policy ends is FAILED in MLflow and W&B alike; one whose
rank 0 is killed is FAILED in MLflow, and one stopped by Ctrl-C KILLED."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import dlaunch, kill_after, metrics, only_run_dir, stopped_run
from tests.integration.test_alerts import FAULTY_MODEL

pytestmark = pytest.mark.integration

RECIPE = """
name: sinks
model: {model}
data: {{source: synthetic, samples: 640, num_features: 16, num_classes: 4}}
optim: {{lr: 5.0e-3}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: 20, eval_every: 10}}
logging:
  run_root: {root}
  progress: false
  report: false
  log_every: {log_every}
  mlflow: {{enabled: true, tracking_uri: "sqlite:///{store}/mlflow.db"}}
  wandb: {{enabled: true}}
"""

# Credentials in the environment, as a user with a tracking server and W&B has them; no
# file of the run and nothing printed may hold them.
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-0a1b2c3d4e", "MLFLOW_TRACKING_TOKEN": "tok-5f6a7b8c9d",
           "WANDB_API_KEY": "wandbkey-1234567890abcdef1234567890abcdef12"}


def train(tmp_path: Path, *, model: str, log_every: int, procs: int = 2, env: dict[str, str] | None = None):
    store = tmp_path / "store"
    store.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, root=tmp_path / "runs", store=store, log_every=log_every))
    result = dlaunch("run", str(recipe), "--procs-per-node", str(procs), cwd=tmp_path,
                     env={**SECRETS, **(env or {})})
    run_dir = only_run_dir(tmp_path / "runs")
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinks").experiment_id])
    return result, run_dir, client, run, store


def wandb_inspect(run_dir: Path, *flags: str) -> str:
    """W&B's own reader of an offline run's transaction log."""
    wandb = Path(sys.executable).parent / "wandb"
    return subprocess.run([str(wandb), "leet", "inspect", "--json", *flags, str(run_dir / "wandb")],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_a_run_reaches_mlflow_wandb_and_tensorboard_with_its_hyperparameters(tmp_path):
    result, run_dir, client, run, store = train(tmp_path, model="{name: mlp, kwargs: {hidden: [64]}}",
                                                log_every=5)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
    [summary] = metrics(run_dir, "summary")
    assert list(losses) == [5, 10, 15, 20]

    # metrics.jsonl: the flattened recipe first.
    hparams = metrics(run_dir)[0]
    assert hparams["kind"] == "hparams"
    assert hparams["params"]["optim.lr"] == 5.0e-3 and hparams["params"]["model.kwargs.hidden"] == [64]

    # MLflow, through its client: one FINISHED run named and tagged for the run dir.
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.tags["dlaunch.run_dir"] == str(run_dir)
    params = run.data.params
    assert (params["optim.lr"], params["train.micro_batch_size"], params["model.kwargs.hidden"]) == \
        ("0.005", "16", "[64]")
    assert (params["plan.world_size"], params["plan.global_batch"]) == ("2", "32")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    val_acc = client.get_metric_history(run.info.run_id, "eval/val_acc")
    assert [m.step for m in val_acc] == [10, 20] and val_acc[-1].value == pytest.approx(summary["val_acc"])
    assert run.data.metrics["summary/steps"] == 20
    recipe_copy = client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path))
    assert Path(recipe_copy).read_text() == (run_dir / "recipe.yaml").read_text()
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run.info.run_id

    # W&B, offline: the recipe as config and file, the metrics at their steps, finished.
    state = json.loads(wandb_inspect(run_dir, "--summary"))
    assert state["state"] == "finished" and state["name"] == run_dir.name
    assert state["config"]["optim.lr"] == 5.0e-3 and state["config"]["model.kwargs.hidden"] == [64]
    assert state["summary"]["eval/val_acc"] == pytest.approx(summary["val_acc"])
    records = [json.loads(line) for line in wandb_inspect(run_dir).splitlines()]
    logged = {r["history"]["step"]["num"]: r["history"]["item"]["train/loss"]
              for r in records if r["type"] == "history" and "train/loss" in r["history"]["item"]}
    assert logged == pytest.approx(losses)
    [files] = (run_dir / "wandb").glob("offline-run-*/files")
    assert (files / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()

    # TensorBoard: the recipe as text; hyperparameters and final metrics for HParams.
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    [text] = events.Tensors("recipe/text_summary")
    assert "lr: 0.005" in text.tensor_proto.string_val[0].decode()
    plugin = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
              for tag, content in events.PluginTagToContent("hparams").items()}
    session = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert session["optim.lr"].number_value == 5.0e-3 and session["model.kwargs.hidden"].string_value == "[64]"
    assert {"eval/val_acc", "summary/val_acc"} <= \
        {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}

    # No credential anywhere: the run dir, the MLflow store, the output.
    written = b"".join(p.read_bytes() for root in (run_dir, store) for p in root.rglob("*") if p.is_file())
    for secret in SECRETS.values():
        assert secret.encode() not in written and secret not in result.stdout + result.stderr


def test_a_run_a_stop_policy_ends_is_failed_in_mlflow_and_wandb(tmp_path):
    (tmp_path / "faulty.py").write_text(FAULTY_MODEL)
    # One process is enough to stop on a NaN: the default policy for non-finite losses.
    result, run_dir, client, run, _ = train(tmp_path, model='{target: "faulty:build"}', log_every=1, procs=1,
                                            env={"FAULT": "nan", "FAULT_AT": "3", "FAULT_RANK": "0"})
    assert result.returncode == 1
    assert "step 3: loss is nan on rank(s) [0]" in result.stderr
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert json.loads(wandb_inspect(run_dir, "--summary"))["state"] == "failed"


def test_a_run_whose_rank_0_is_killed_is_failed_in_mlflow(tmp_path):
    """Rank 0 SIGKILLed: nothing of the trainer tells MLflow; `dlaunch run` does, once the
    job is over."""
    result, _, _, run, _ = train(tmp_path, model="{name: mlp, kwargs: {hidden: [16]}}", log_every=1,
                                 env=kill_after(5, rank=0))
    assert result.returncode == 1
    assert run.info.status == "FAILED"


def test_a_run_stopped_by_ctrl_c_is_killed_in_mlflow(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model="{name: mlp, kwargs: {hidden: [16]}}", root=tmp_path / "runs",
                                    store=store, log_every=1).replace("max_steps: 20", "max_steps: 100000, early_stopping: {patience: null}"))
    # Once training runs, the MLflow run is open.
    code, err = stopped_run("run", str(recipe), "--procs-per-node", "2",
                            once=lambda: bool(list(tmp_path.glob("runs/*/checkpoints/latest"))))
    assert code == 128 + signal.SIGINT, err[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinks").experiment_id])
    assert run.info.status == "KILLED"
