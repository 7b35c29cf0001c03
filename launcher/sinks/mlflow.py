"""MLflow: one MLflow run per run directory, through MLflow's own client.

The hyperparameters become the run's params, recipe.yaml its artifact, every number of
every record a metric at its step (`train/loss`, `eval/val_acc`), and the run ends
FINISHED, FAILED (training raised) or KILLED (preempted; the resumed run continues the
same MLflow run, whose id RUN_DIR/mlflow.json keeps). A run whose rank 0 could not say
(killed, hung, stopped by Ctrl-C) is ended FAILED or KILLED once the job is over: by
`dlaunch run`, and on Slurm by the batch script (`python -m launcher.sinks.mlflow
RUN_DIR`), which `dlaunch submit` leaves to run alone.

Where: `logging.mlflow.tracking_uri`, else MLFLOW_TRACKING_URI as MLflow reads it, else a
SQLite store `<run_root>/mlruns/mlflow.db` (MLflow 3 refuses its old `./mlruns` file
store unless told to, and names SQLite as the local default). Credentials stay in
MLflow's environment variables, which MLflow reads itself and dlaunch never touches.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from launcher.plan import LaunchPlan
from launcher.rundir import MLFLOW_RUN, PLAN, RECIPE, run_root, write_atomic
from launcher.sinks import Status, as_text, scalars

log = logging.getLogger("launcher.sinks")
# Our INFO, everyone's WARNING (as the rank logs have it): MLflow would announce on rank
# 0's terminal each time it creates or checks a SQLite store's tables.
logging.getLogger("mlflow").setLevel(logging.WARNING)

RUN_DIR_TAG = "dlaunch.run_dir"
_STATUS = {"finished": RunStatus.FINISHED, "failed": RunStatus.FAILED, "preempted": RunStatus.KILLED}


def local_store(root: str | Path) -> str:
    """The SQLite store under a run root, absolute: ranks may start elsewhere."""
    return f"sqlite:///{Path(root).absolute() / 'mlruns' / 'mlflow.db'}"


def sqlite_artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment in a SQLite store keeps its artifacts: `artifacts/` beside
    the database, rather than MLflow's `./mlruns` in whatever directory rank 0 runs in.
    None for other stores, whose server (or file layout) decides."""
    prefix = "sqlite:///"
    database = tracking_uri[len(prefix):].split("?")[0] if tracking_uri.startswith(prefix) else ""
    if database in ("", ":memory:"):
        return None
    return (Path(database).absolute().parent / "artifacts").as_uri()


def mlflow_params(params: dict[str, Any]) -> list[Param]:
    """The hyperparameters as MLflow params: text, cut to MLflow's limits the way its own
    autologging cuts them (the end replaced by `...`)."""
    return [Param(_cut(key, MAX_ENTITY_KEY_LENGTH), _cut(as_text(value), MAX_PARAM_VAL_LENGTH))
            for key, value in params.items()]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class MlflowSink:
    def __init__(self, plan: LaunchPlan) -> None:
        self._config = plan.recipe.logging.mlflow
        self._run_dir = Path(plan.run_dir)
        self._experiment = self._config.experiment or plan.recipe.name
        self._default_store = local_store(run_root(plan.recipe, plan.topology.backend))
        self._client: MlflowClient | None = None
        self._run_id = ""

    def start(self, params: dict[str, Any], recipe_text: str) -> None:
        uri, where = self._tracking_uri()
        self._client = MlflowClient(tracking_uri=uri)
        record = self._run_dir / MLFLOW_RUN
        if record.exists():  # a resumed run: the same MLflow run, running again
            self._run_id = json.loads(record.read_text())["run_id"]
            self._client.update_run(self._run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            experiment_id = self._experiment_id(uri)
            run = self._client.create_run(experiment_id, run_name=self._run_dir.name,
                                          tags=resolve_tags({RUN_DIR_TAG: str(self._run_dir)}))
            self._run_id = run.info.run_id
            write_atomic(record, json.dumps({"experiment_id": experiment_id, "run_id": self._run_id}) + "\n")
            entries = mlflow_params(params)
            for first in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self._run_id, params=entries[first:first + MAX_PARAMS_TAGS_PER_BATCH])
            self._client.log_text(self._run_id, recipe_text, RECIPE)
        log.info("mlflow: run %s in experiment %r at %s", self._run_id, self._experiment, where)

    def _tracking_uri(self) -> tuple[str, str]:
        """The URI, and how to name it in the log: an environment variable's value may
        hold credentials, so the log names the variable."""
        if self._config.tracking_uri:
            return self._config.tracking_uri, self._config.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
        Path(self._default_store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return self._default_store, self._default_store

    def _experiment_id(self, uri: str) -> str:
        experiment = self._client.get_experiment_by_name(self._experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(self._experiment, artifact_location=sqlite_artifact_root(uri))
        except MlflowException as exc:  # a concurrent sweep trial created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(self._experiment).experiment_id

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars(kind, values).items()]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, status: Status) -> None:
        self._client.set_terminated(self._run_id, RunStatus.to_string(_STATUS[status]))

    def end_if_left_running(self, stopped: bool) -> None:
        """Once a job has failed or been stopped: end its MLflow run FAILED (``stopped``:
        KILLED) if rank 0 left it RUNNING. A rank killed, hung or stopped by a signal
        exits without a word to MLflow, which has no heartbeat to notice; the run would
        show as running for good."""
        record = self._run_dir / MLFLOW_RUN
        if not record.exists():  # rank 0 never got to start it
            return
        run_id = json.loads(record.read_text())["run_id"]
        client = MlflowClient(tracking_uri=self._tracking_uri()[0])
        if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED if stopped else RunStatus.FAILED))


def end_left_running(plan: LaunchPlan, stopped: bool) -> None:
    """`MlflowSink.end_if_left_running` for a job that is over, said in one line if
    MLflow cannot be reached: the job's outcome stands, and the exception's message
    could hold a URI's secret."""
    try:
        MlflowSink(plan).end_if_left_running(stopped)
    except Exception as exc:
        print(f"dlaunch: could not end the run in MLflow ({type(exc).__name__}); it may show as RUNNING",
              file=sys.stderr)


if __name__ == "__main__":  # the Slurm batch script, once a job has failed for good
    end_left_running(LaunchPlan.from_json((Path(sys.argv[1]) / PLAN).read_text()), stopped=False)
