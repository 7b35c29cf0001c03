"""Training-health alerts (the recipe's ``alerts:``): exploding gradients, vanishing
gradients, loss spikes, and NaN/Inf, checked after every step on every rank alike.

Each alert is a line in RUN_DIR/alerts.jsonl (rank 0) and a warning in the log, and its
policy decides what follows: warn; skip (the engine was asked not to apply a step whose
gradients are bad, and did not); or stop (the run ends with an error naming the step and
the alert, raised before the step can reach a checkpoint). All ranks see the same
inputs (the loss gathered from every rank, the global gradient norm), so all decide
alike and none is left waiting in a collective.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from launcher import checkpoint
from launcher.engines.base import StepResult
from launcher.errors import FinalFailure
from launcher.recipe import AlertsConfig

log = logging.getLogger("launcher.alerts")

ALERTS = "alerts.jsonl"

Action = Literal["warned", "skipped", "stopped"]


class AlertStop(FinalFailure):
    """A stop policy ended the run."""


class NonFiniteLoss(AlertStop):
    pass


@dataclass(frozen=True)
class Alert:
    kind: str
    step: int
    action: Action
    message: str


class Alerts:
    def __init__(self, cfg: AlertsConfig, run_dir: Path, *, write: bool) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.write = write
        self.recent: deque[float] = deque(maxlen=cfg.loss_spike.window)
        self.low_checks: dict[str, int] = {}
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on alerting as the uninterrupted one would:
        the loss window of the spike check and the vanishing-gradient counts."""
        return {"recent": list(self.recent), "low_checks": dict(self.low_checks), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.extend(state["recent"])
        self.low_checks.update(state["low_checks"])
        self.skipped = state["skipped"]

    @property
    def skip_above(self) -> float | None:
        """The gradient norm above which the engine must not apply a step (non-finite
        norms always count as above), or None: every step is applied."""
        if self.cfg.exploding_grad.policy == "skip":
            return self.cfg.exploding_grad.threshold
        return math.inf if self.cfg.nonfinite.policy == "skip" else None

    def check(self, step: int, loss: float, bad_ranks: list[int], result: StepResult) -> list[Alert]:
        """The alerts of a finished step; raises when one's policy is stop."""
        alerts = []
        # An fp16 overflow's Inf norm is the loss scaler's business: it skipped the step
        # and lowered its scale.
        norm = None if result.overflow else result.grad_norm
        if bad_ranks or (norm is not None and not math.isfinite(norm)):
            alerts.append(self._nonfinite(step, loss, bad_ranks, result))
        elif norm is not None and norm > self.cfg.exploding_grad.threshold:
            alerts.append(self._exploding(step, norm, result))
        else:
            alerts += self._spike(step, loss)
        alerts += self._vanishing(step, result.module_grad_norms or {})
        for alert in alerts:
            self._record(alert)
        stopped = [a for a in alerts if a.action == "stopped"]
        if stopped:
            raise (NonFiniteLoss if stopped[0].kind == "nonfinite" else AlertStop)(stopped[0].message)
        return alerts

    def _nonfinite(self, step: int, loss: float, bad_ranks: list[int], result: StepResult) -> Alert:
        where = f"loss is {loss} on rank(s) {bad_ranks}" if bad_ranks else f"gradient norm is {result.grad_norm}"
        if self.cfg.nonfinite.policy == "skip" and not result.applied:
            return Alert("nonfinite", step, "skipped", f"step {step}: {where}; the step was skipped")
        good = checkpoint.latest(self.run_dir)
        applied = " and the engine applied the step" if self.cfg.nonfinite.policy == "skip" else ""
        return Alert("nonfinite", step, "stopped", f"step {step}: {where}{applied}; the last good checkpoint "
                                                   f"is {good.name if good else 'none'}")

    def _exploding(self, step: int, norm: float, result: StepResult) -> Alert:
        policy = self.cfg.exploding_grad.policy
        action: Action = "skipped" if policy == "skip" and not result.applied else \
            "stopped" if policy == "stop" else "warned"
        return Alert("exploding_grad", step, action, f"step {step}: gradient norm {norm:.4g} is above "
                                                    f"{self.cfg.exploding_grad.threshold:g}")

    def _spike(self, step: int, loss: float) -> list[Alert]:
        spike = self.cfg.loss_spike
        found = []
        if len(self.recent) == spike.window and loss > spike.factor * statistics.median(self.recent):
            found.append(Alert("loss_spike", step, "stopped" if spike.policy == "stop" else "warned",
                               f"step {step}: loss {loss:.4g} is above {spike.factor:g} x the median "
                               f"{statistics.median(self.recent):.4g} of the last {spike.window} steps"))
        self.recent.append(loss)
        return found

    def _vanishing(self, step: int, norms: dict[str, float]) -> list[Alert]:
        """Once per module each time it has stayed below the threshold `checks` times."""
        vanishing = self.cfg.vanishing_grad
        found = []
        for module, norm in norms.items():
            low = self.low_checks.get(module, 0) + 1 if norm < vanishing.threshold else 0
            self.low_checks[module] = low
            if low == vanishing.checks:
                found.append(Alert("vanishing_grad", step, "stopped" if vanishing.policy == "stop" else "warned",
                                   f"step {step}: module {module!r} has had a gradient norm below "
                                   f"{vanishing.threshold:g} for {low} checks (now {norm:.3g})"))
        return found

    def _record(self, alert: Alert) -> None:
        self.skipped += alert.action == "skipped"
        log.warning("alert %s (%s): %s", alert.kind, alert.action, alert.message)
        if self.write:
            with open(self.run_dir / ALERTS, "a") as out:
                out.write(json.dumps(asdict(alert)) + "\n")
