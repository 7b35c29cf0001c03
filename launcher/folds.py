"""`dlaunch run --folds K`: the recipe trained once per fold, then each validation
metric's mean and standard deviation over the folds.

The fold runs live together: RUN_ROOT/<name>-<stamp>-folds/fold-<f>/, each an ordinary
run directory (status, logs, --resume and eval work on it), and folds.json beside them.
`dlaunch run --resume` of that folds directory continues the folds a stop or a failure
left unfinished, in order, and then summarizes all of them.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.monitor import read_records
from launcher.recipe import DataConfig
from launcher.rundir import PLAN, write_atomic

SUMMARY = "folds.json"
FOLDED = {"holdout": "kfold", "stratified": "stratified_kfold", "kfold": "kfold",
          "stratified_kfold": "stratified_kfold", "walk_forward": "walk_forward"}
"""The strategy a recipe's folds use: a holdout recipe gets k-fold, a stratified one
stratified k-fold; the folded strategies keep theirs."""
REPORTED = ("val_loss", "val_acc")
_FOLD_DIR = re.compile(r"fold-(\d+)")


def fold_run_dir(folds_dir: Path, fold: int) -> Path:
    return folds_dir / f"fold-{fold}"


def fold_number(run_dir: str | Path) -> int | None:
    """Which fold of a `--folds` run ``run_dir`` is; None for a run of its own."""
    run_dir = Path(run_dir)
    match = _FOLD_DIR.fullmatch(run_dir.name)
    return int(match[1]) if match and run_dir.parent.name.endswith("-folds") else None


def fold_run_dirs(folds_dir: Path) -> list[Path]:
    """The run directories of a `--folds` run's folds, in fold order; [] for any other
    directory."""
    dirs = [plan.parent for plan in folds_dir.glob(f"fold-*/{PLAN}") if fold_number(plan.parent) is not None]
    return sorted(dirs, key=fold_number)


def fold_overrides(data: DataConfig, folds: int, fold: int) -> list[str]:
    """The --set overrides that make a recipe's run fold ``fold`` of ``folds``."""
    if folds < 2:
        raise UsageError(f"--folds {folds}: cross-validation needs 2 or more folds", key="--folds")
    return [f"data.validation={FOLDED[data.validation]}", f"data.folds={folds}", f"data.fold={fold}"]


def summarize(run_dirs: list[Path]) -> dict[str, Any]:
    """Each fold's final evaluation and, per metric, mean and standard deviation (the
    population's, as scikit-learn's cross_val_score(...).std()); written to folds.json
    in the folds' directory."""
    folds = []
    for run_dir in run_dirs:
        [summary] = read_records(run_dir, "summary") or [{}]
        folds.append({"run_dir": str(run_dir), **{m: summary.get(m) for m in REPORTED}})
    result: dict[str, Any] = {"folds": folds}
    for metric in REPORTED:
        values = [fold[metric] for fold in folds if fold[metric] is not None]
        if len(values) == len(folds):
            result[metric] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    write_atomic(run_dirs[0].parent / SUMMARY, json.dumps(result, indent=2) + "\n")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """One line per metric: `val_acc 0.9512 ± 0.0081 over 5 folds (0.95, 0.94, ...)`."""
    lines = []
    for metric in REPORTED:
        if metric in result:
            each = ", ".join(f"{fold[metric]:.4f}" for fold in result["folds"])
            lines.append(f"{metric} {result[metric]['mean']:.4f} ± {result[metric]['std']:.4f} over "
                         f"{len(result['folds'])} folds ({each})")
    return "\n".join(lines)
