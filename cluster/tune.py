"""`dlaunch sweep`: a recipe's `sweep:` section as a Ray Tune search whose trials are
distributed dlaunch jobs, each run by the Ray backend in the placement group Tune
reserved for it (a bundle per node).

SWEEP_DIR/
  recipe.yaml     the resolved recipe every trial starts from (its sweep: included)
  sweep.json      the trials' topology and working directory
  tune/           Ray Tune's experiment state: what `dlaunch sweep --resume` restores;
                  under PBT, also Tune's copies of each trial's last checkpoints
  trials/<id>/    each trial's run directory, and trial.json: its overrides and its end
  trials.json     one row per trial: overrides, end, evaluations, metric
  best.yaml       the best finished trial's recipe, for `dlaunch run`
  metric.png      the metric of every trial over the steps

A trial passes every evaluation on to Tune as it appears in its metrics.jsonl, so a
scheduler can stop it early. Its end is written to trial.json by the trial (finished)
or by the driver (stopped by the scheduler, failed), so a resumed sweep never runs a
finished trial again, even one Tune's last saved state still calls running.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.util import get_current_placement_group

from cluster.ray import RayBackend, connected, node_bundles, ray_address
from cluster.tune_space import param_space, search_algorithm, trial_scheduler, tune_checkpoints
from launcher import tune_gate
from launcher.manifest import verify
from launcher.monitor import read_records, read_resumed_records
from launcher.plan import LaunchPlan, StepPlan
from launcher.rundir import CHECKPOINTS, PLAN, RECIPE, write_atomic
from launcher.sweep import SweepSpec, overrides_for
from launcher.yamlio import dump_yaml

SETTINGS = "sweep.json"
TUNE_DIR = "tune"
TRIALS = "trials"
TRIAL_RECORD = "trial.json"
TABLE = "trials.json"
BEST = "best.yaml"
PLOT = "metric.png"
REPORTING = ".tune-checkpoint"
"""A trial's hard-linked copy of the checkpoint it is handing to Tune, while Tune copies it."""


# -- a trial: runs inside a Tune trainable on the cluster -------------------------------


def plan_trial(sweep_dir: Path, settings: dict[str, Any], overrides: list[str], run_dir: Path) -> LaunchPlan:
    """The plan of one trial: the sweep's recipe with the trial's values, on Ray."""
    from launcher.data.facts import describe
    from launcher.host import detect_host
    from launcher.models.facts import model_facts
    from launcher.plan import build_plan
    from launcher.recipe import load_recipe

    recipe, _ = load_recipe(sweep_dir / RECIPE, overrides)
    data = describe(recipe.data)
    return build_plan(recipe, host=detect_host(), data=data, run_dir=str(run_dir), backend="ray",
                      nodes=settings["nodes"], procs_per_node=settings["procs_per_node"],
                      model=model_facts(recipe, data),
                      user_env=settings.get("user_env", {}))  # absent from older sweep.json files


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / TRIAL_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_atomic(run_dir / TRIAL_RECORD, json.dumps(record, indent=2) + "\n")


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    return read_records(run_dir, "eval")


def _summary(run_dir: Path) -> bool:
    """Whether the trial's training ran to its end (the trainer's last record)."""
    return bool(read_records(run_dir, "summary"))


class _NewEvals:
    """The evaluations a trial's metrics.jsonl gained since the last look.

    Given the trial's ``steps`` (under PBT), the newest evaluation, at a step the trainer
    also checkpoints, waits for that checkpoint, which the trainer writes just after it:
    PBT copies only a checkpoint reported with a result, and a trial reported without
    one is no donor (in one test run the good trials were reported so at every
    perturbation, and nothing was exploited). It waits until the checkpoint is in place,
    a later evaluation shows the trainer went past it, or the job has ended."""

    def __init__(self, run_dir: Path, skip_existing: bool, steps: StepPlan | None = None) -> None:
        self.run_dir = run_dir
        self.seen = len(_evals(run_dir)) if skip_existing else 0
        self.steps = steps

    def __call__(self, ended: bool = False) -> list[dict[str, Any]]:
        new = _evals(self.run_dir)[self.seen:]
        if new and not ended and self._awaits_checkpoint(new[-1]["step"]):
            new = new[:-1]
        self.seen += len(new)
        return new

    def _awaits_checkpoint(self, step: int) -> bool:
        steps = self.steps
        if steps is None or (step % steps.checkpoint_every and step != steps.total):
            return False
        return not (self.run_dir / CHECKPOINTS / f"step-{step:08d}").exists()


def _report_all(records: list[dict[str, Any]], run_dir: Path, pbt: bool) -> None:
    for record in records:
        _report(record, run_dir, with_checkpoint=pbt)
        if pbt:  # Tune took it and let the trial go on: so may its job
            tune_gate.let_through(run_dir, record["step"])


def _report(record: dict[str, Any], run_dir: Path, with_checkpoint: bool) -> None:
    metrics = {key: record[key] for key in ("val_loss", "val_acc")} | {"step": record["step"]}
    if not with_checkpoint:
        tune.report(metrics)
        return
    # PBT copies a better trial's checkpoint into a worse one. The job waits while Tune
    # copies (launcher/tune_gate.py), but a checkpoint pruned (train.keep_last) before the
    # trial got to it must not reach Tune in part: Tune gets a hard-linked copy that
    # nothing else deletes, or none.
    frozen = _frozen_copy(run_dir / CHECKPOINTS / f"step-{record['step']:08d}", run_dir / REPORTING)
    try:
        tune.report(metrics, checkpoint=None if frozen is None else tune.Checkpoint.from_directory(str(frozen)))
    finally:
        shutil.rmtree(run_dir / REPORTING, ignore_errors=True)


def _frozen_copy(checkpoint: Path, into: Path) -> Path | None:
    """``checkpoint`` hard-linked into ``into`` (same files, no bytes copied), if it is
    there and whole: none of its files deleted before they were linked; else None."""
    shutil.rmtree(into, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, into, copy_function=os.link)
    except (FileNotFoundError, shutil.Error):  # pruned, wholly or in part, as it was linked
        return None
    return into if not verify(into, hashes=False) else None


def _adopt(checkpoint: tune.Checkpoint, run_dir: Path) -> int:
    """Make Tune's checkpoint (another trial's, under PBT) this run's latest; its step."""
    from launcher.checkpoint import LATEST, TRAINER_STATE

    with checkpoint.as_directory() as source:
        step = json.loads((Path(source) / TRAINER_STATE).read_text())["step"]
        root = run_dir / CHECKPOINTS
        target = root / f"step-{step:08d}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        write_atomic(root / LATEST, target.name)
    return step


def run_trial(config: dict[str, Any], sweep_dir: str, pbt: bool) -> None:
    """The Tune trainable: plan, run and watch one trial, a distributed job."""
    from launcher import rundir

    sweep = Path(sweep_dir)
    settings = json.loads((sweep / SETTINGS).read_text())
    os.chdir(settings["cwd"])  # where the sweep was started: the recipe's relative paths
    trial_id = tune.get_context().get_trial_id()
    run_dir = sweep / TRIALS / trial_id
    overrides = overrides_for(config)
    record = _read_record(run_dir)
    if record is not None and record["end"] is None and _summary(run_dir):
        # Its training ended, but the sweep was interrupted before that was recorded.
        record = {**record, "end": "finished"}
        _write_record(run_dir, record)
    if record is not None and record["end"] is not None:
        # Finished before the sweep was interrupted: report where it ended, run nothing.
        evals = _evals(run_dir)
        if evals:
            _report(evals[-1], run_dir, with_checkpoint=False)
        return
    resuming = (run_dir / PLAN).exists()
    plan = plan_trial(sweep, settings, overrides, run_dir)
    if not resuming:
        rundir.create(plan, settings["command"])
    elif record is not None and record["overrides"] != overrides:  # PBT changed the values
        write_atomic(run_dir / PLAN, plan.to_json())
        write_atomic(run_dir / RECIPE, dump_yaml(plan.recipe.model_dump(mode="json")))
    # Under PBT, the weights this trial goes on from: Tune's copy of a checkpoint some
    # trial (this one, or a better one) reported, named after that trial.
    adopted = record.get("adopted", []) if record else []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        adopted.append({"checkpoint": checkpoint.path, "step": _adopt(checkpoint, run_dir)})
    record = {"trial_id": trial_id, "overrides": overrides, "end": None, "adopted": adopted}
    _write_record(run_dir, record)

    new_evals = _NewEvals(run_dir, skip_existing=resuming, steps=plan.training.steps if pbt else None)
    if pbt:  # the job waits for Tune's decision at each evaluation (launcher/tune_gate.py)
        tune_gate.reset(run_dir)
        plan = plan.model_copy(update={"env": {**plan.env, tune_gate.ENV: "1"}})
    job = RayBackend(group=get_current_placement_group()).submit(plan)
    code = job.wait(every_poll=lambda: _report_all(new_evals(), run_dir, pbt))
    _report_all(new_evals(ended=True), run_dir, pbt)
    if code != 0:
        raise RuntimeError(f"trial {trial_id} failed (exit code {code}); see {run_dir / 'logs'}")
    _write_record(run_dir, {**record, "end": "finished"})


class TrialEnds(tune.Callback):
    """Records, on the driver, the ends a trial cannot record itself."""

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir

    def _mark(self, trial: Any, end: str) -> None:
        run_dir = Path(self.sweep_dir) / TRIALS / trial.trial_id
        record = _read_record(run_dir)
        if record is not None and record["end"] is None:
            _write_record(run_dir, {**record, "end": end})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Unless the trial wrote `finished` itself: its training may also have ended
        # while the scheduler decided (its summary written), and then it did finish.
        run_dir = Path(self.sweep_dir) / TRIALS / trial.trial_id
        self._mark(trial, "finished" if _summary(run_dir) else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, "failed")


# -- the driver -------------------------------------------------------------------------


def horizon(plans: list[LaunchPlan]) -> int:
    """The most evaluations a trial makes: every eval_every steps, and at the last step.
    The schedulers get one more as max_t: at max_t ASHA stops a trial, and a trial must
    end by itself, its final weights and summary written."""
    return max(-(-plan.training.steps.total // plan.training.steps.eval_every) for plan in plans)


def _tuner(sweep_dir: Path, spec: SweepSpec, plans: list[LaunchPlan], spread: bool) -> tune.Tuner:
    pbt = spec.scheduler.name == "pbt"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep_dir=str(sweep_dir), pbt=pbt),
        # An empty head bundle: the trainable only watches; its bundles, one per node,
        # hold the ranks.
        tune.PlacementGroupFactory([{}, *node_bundles(plans[0])],
                                   strategy="STRICT_SPREAD" if spread else "PACK"))
    state = sweep_dir / TUNE_DIR
    if tune.Tuner.can_restore(str(state)):
        return tune.Tuner.restore(str(state), trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            # The random and grid searcher limits itself (cluster/tune_space.py); Tune
            # wraps Optuna's in a limiter of its own.
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent if spec.search == "optuna" else None,
            search_alg=search_algorithm(spec), scheduler=trial_scheduler(spec, horizon(plans) + 1),
            reuse_actors=False),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), verbose=1,
                                  callbacks=[TrialEnds(str(sweep_dir))],
                                  checkpoint_config=tune_checkpoints(spec),
                                  failure_config=tune.FailureConfig(max_failures=0)))


def run_sweep(sweep_dir: Path, spec: SweepSpec, plans: list[LaunchPlan]) -> int:
    """Run (or resume) the sweep in ``sweep_dir``; ``plans`` are trial plans made up
    front (the first is the recipe's own), for resources and the scheduler's horizon."""
    address = ray_address(plans[0])
    per_trial = sum(bundle.get("CPU", 0) for bundle in node_bundles(plans[0]))
    with connected(address, cpus_needed=per_trial * (spec.max_concurrent or 1)):
        _tuner(sweep_dir, spec, plans, spread=address is not None).fit()
    rows = summarize(sweep_dir, spec)
    print_table(rows, spec)
    best = write_best(sweep_dir, rows, spec)
    plot(sweep_dir, rows, spec)
    if best is None:
        print("error: no trial finished; see trials.json and the trials' logs", file=sys.stderr)
        return 1
    print(f"dlaunch: best trial {best['trial_id']}: {spec.metric} {best['last']:.4f}; "
          f"{sweep_dir / BEST}", file=sys.stderr)
    return 0


# -- the results ------------------------------------------------------------------------


def summarize(sweep_dir: Path, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = []
    for run_dir in sorted((sweep_dir / TRIALS).iterdir()):
        record = _read_record(run_dir)
        if record is None:
            continue
        evals = read_resumed_records(run_dir, "eval")  # once each, however often it resumed
        rows.append({"trial_id": record["trial_id"], "overrides": record["overrides"],
                     "end": record["end"] or "interrupted", "evaluations": len(evals),
                     "last": evals[-1][spec.metric] if evals else None,
                     "curve": [(e["step"], e[spec.metric]) for e in evals]})
    write_atomic(sweep_dir / TABLE, json.dumps([{k: v for k, v in row.items() if k != "curve"}
                                                for row in rows], indent=2) + "\n")
    return rows


def _best(rows: list[dict[str, Any]], spec: SweepSpec) -> dict[str, Any] | None:
    """The best trial that ran to its end: a trial stopped early has no final metric
    that `dlaunch run best.yaml` could reproduce."""
    finished = [row for row in rows if row["end"] == "finished" and row["last"] is not None]
    if not finished:
        return None
    pick = max if spec.mode == "max" else min
    return pick(finished, key=lambda row: row["last"])


def write_best(sweep_dir: Path, rows: list[dict[str, Any]], spec: SweepSpec) -> dict[str, Any] | None:
    best = _best(rows, spec)
    if best is None:
        return None
    recipe = yaml.safe_load((sweep_dir / TRIALS / best["trial_id"] / RECIPE).read_text())
    recipe.pop("sweep", None)
    settings = json.loads((sweep_dir / SETTINGS).read_text())
    recipe["cluster"].update(nodes=settings["nodes"], procs_per_node=settings["procs_per_node"])
    header = (f"# The best trial ({best['trial_id']}) of the sweep in {sweep_dir}:\n"
              f"# {spec.metric} {best['last']:.6g} at its end. Its values: "
              f"{', '.join(best['overrides']) or 'the recipe as it is'}.\n")
    write_atomic(sweep_dir / BEST, header + dump_yaml(recipe))
    return best


def print_table(rows: list[dict[str, Any]], spec: SweepSpec) -> None:
    from rich.console import Console
    from rich.table import Table

    best = _best(rows, spec)
    table = Table(title=f"{len(rows)} trials, {spec.metric} ({spec.mode})")
    for column in ("trial", "values", "end", "evals", spec.metric):
        table.add_column(column)
    for row in rows:
        mark = " *" if best is not None and row["trial_id"] == best["trial_id"] else ""
        table.add_row(row["trial_id"], ", ".join(row["overrides"]), row["end"], str(row["evaluations"]),
                      "-" if row["last"] is None else f"{row['last']:.4f}{mark}")
    Console(stderr=True).print(table)


def plot(sweep_dir: Path, rows: list[dict[str, Any]], spec: SweepSpec) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row["curve"]:
            steps, values = zip(*row["curve"])
            values_set = ", ".join(o.split(".")[-1] for o in row["overrides"])
            axes.plot(steps, values, marker="o", label=f"{row['trial_id']} {values_set} ({row['end']})")
    axes.set_xlabel("step")
    axes.set_ylabel(spec.metric)
    axes.set_title(f"{sweep_dir.name}: {spec.metric} per trial")
    axes.legend(fontsize="x-small", ncols=1 + len(rows) // 12, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(sweep_dir / PLOT, dpi=100, bbox_inches="tight")
    plt.close(figure)
