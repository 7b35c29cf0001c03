"""`dlaunch eval --ensemble RUN_DIR [--split val|test] [--last K]`: a run's snapshots
(``schedule.snapshots``) scored alone, its final weights, and the snapshot ensemble:
the average of the snapshots' softmax probabilities (Huang et al. 2017), all on the
same rows, written to RUN_DIR/eval-<split>-ensemble.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from launcher.errors import UsageError
from launcher.evaluate import WEIGHTS, Split, finished_plan, load_model, score, split_rows
from launcher.rundir import write_atomic
from launcher.snapshots import INDEX, SNAPSHOTS, read_index


class AveragedProbabilities:
    """The ensemble as one predictor: the log of the members' mean softmax. Taken as
    logits by ``score``, its cross-entropy is the negative log of the averaged
    probability of the target and its argmax the averaged prediction."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        self.members = list(members)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([member(inputs).float().log_softmax(-1) for member in self.members])
        return log_probs.logsumexp(0) - math.log(len(self.members))


def evaluate_ensemble(run_dir: Path, split: Split, last: int | None = None,
                      batch_size: int = 256) -> dict:
    """Each snapshot's, the final weights' and the ensemble of the ``last`` snapshots
    (default: all) scores on ``split``."""
    plan = finished_plan(run_dir)
    snapshots = read_index(run_dir)
    if not snapshots:
        raise UsageError(f"{str(run_dir)!r} has no snapshots ({SNAPSHOTS}/{INDEX}); train with "
                         "schedule.name: cosine_restarts and schedule.snapshots: true", key="--ensemble")
    if last is not None and not 1 <= last <= len(snapshots):
        raise UsageError(f"{last} is not between 1 and the run's {len(snapshots)} snapshots", key="--last")
    for entry in snapshots:
        if not (run_dir / SNAPSHOTS / entry["file"]).is_file():
            raise UsageError(f"{SNAPSHOTS}/{entry['file']} is listed in {INDEX} but missing", key="RUN_DIR")
    dataset = split_rows(plan, split)
    models = [load_model(plan, run_dir / SNAPSHOTS / entry["file"]) for entry in snapshots]
    members = snapshots[-last:] if last else snapshots
    loss_key, acc_key = f"{split}_loss", f"{split}_acc"

    def scores_of(predict) -> dict[str, float]:
        loss, accuracy = score(predict, dataset, plan.recipe.data, batch_size)
        return {loss_key: loss, acc_key: accuracy}

    with torch.no_grad():
        singles = [{"snapshot": entry["file"], "cycle": entry["cycle"], "step": entry["step"],
                    **scores_of(model)} for entry, model in zip(snapshots, models, strict=True)]
        # The run's last step is always a snapshot: the final weights are that step's.
        final = {"weights": WEIGHTS, "step": snapshots[-1]["step"],
                 **scores_of(load_model(plan, run_dir / WEIGHTS))}
        ensemble = {"members": [entry["file"] for entry in members],
                    **scores_of(AveragedProbabilities(models[-len(members):]))}
    result = {"split": split, "rows": len(dataset), "snapshots": singles, "final": final, "ensemble": ensemble}
    write_atomic(run_dir / f"eval-{split}-ensemble.json", json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    """One row per snapshot, the final weights and the ensemble."""
    split = result["split"]
    loss_key, acc_key = f"{split}_loss", f"{split}_acc"
    rows = [(s["snapshot"], str(s["step"]), s[loss_key], s[acc_key]) for s in result["snapshots"]]
    final, ensemble = result["final"], result["ensemble"]
    rows.append((f"final ({final['weights']})", str(final["step"]), final[loss_key], final[acc_key]))
    rows.append((f"ensemble of {len(ensemble['members'])}", "-", ensemble[loss_key], ensemble[acc_key]))
    width = max(len("snapshot"), *(len(name) for name, *_ in rows))
    lines = [f"{'snapshot':<{width}}  {'step':>8}  {loss_key:>10}  {acc_key:>9}"]
    lines += [f"{name:<{width}}  {step:>8}  {loss:>10.4f}  {acc:>9.4f}" for name, step, loss, acc in rows]
    return "\n".join(lines)
