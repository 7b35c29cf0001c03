"""The arithmetic of the LR range test (Leslie Smith, "Cyclical Learning Rates for
Training Neural Networks", 2017, section 3.3; fastai's ``lr_find``), free of torch so
that it is tested on synthetic curves.

The test trains for a few optimizer steps while the LR grows exponentially from a tiny
to a huge value, and watches the loss: flat while the LR is too small to matter,
falling where it trains, and blowing up where it is too large. The raw loss of one
batch is noisy, so the curve read is its exponential moving average.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.report import ema

BETA = 0.98
"""The smoothing of the loss, as fastai's: each step weighs 2% in the average."""
DIVERGENCE = 4.0
"""The sweep stops once the smoothed loss exceeds this many times its minimum so far
(fastai's rule): the LRs beyond only make it worse."""
RULE = "minimum/10"
"""The suggestion: a tenth of the LR at the smoothed loss's minimum (fastai's ``minimum``)."""


def sweep_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """``steps`` LRs from ``min_lr`` to ``max_lr`` (both included), evenly spaced on a log
    scale: each decade gets the same number of steps."""
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float]) -> list[float]:
    """The EMA of ``losses`` with bias correction: dividing by 1 - BETA**n keeps the first
    points from being dragged towards the zero the average starts at."""
    return ema(losses, BETA)


def diverged(smoothed: list[float]) -> bool:
    """Whether the last smoothed loss is past DIVERGENCE x the lowest one."""
    return smoothed[-1] > DIVERGENCE * min(smoothed)


@dataclass(frozen=True)
class Suggestion:
    lr: float
    minimum_at: float
    """The LR at which the smoothed loss is lowest."""


def suggest(lrs: list[float], smoothed: list[float]) -> Suggestion:
    """A tenth of the LR at the lowest smoothed loss. At the minimum the LR is already at
    the edge of what trains (Smith's upper bound); the smoothed loss also lags the raw one
    (its average reaches about 50 steps back), so that the minimum and the steepest fall
    appear at LRs higher than where they happened. A tenth is an order of magnitude
    inside the region where the loss falls, and the rule needs no derivative of a noisy
    curve. (It lies below the sweep when the loss was lowest in its first decade.)"""
    if len(lrs) != len(smoothed) or not lrs:
        raise ValueError("lrs and smoothed must be equally long, and not empty")
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    return Suggestion(lrs[lowest] / 10, lrs[lowest])
