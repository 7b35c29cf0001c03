"""`dlaunch report`: plots and a summary table of one run, or of several overlaid.

Everything comes from the run directory's record: metrics.jsonl for the curves,
plan.json for the settings. Runs are told apart in legends by what differs between
their recipes (``lr=0.003`` against ``lr=0.0003``), not by time stamps alone: that is
what makes an overlay of a sweep or an ablation readable.

matplotlib is imported only while plots are drawn, through its object API (``Figure``,
not pyplot): no global backend or figure registry changes under other users of the
process.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UsageError
from launcher.monitor import read_records, read_resumed_records
from launcher.rundir import METRICS, PLAN

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SUMMARY = "summary.md"
DPI = 110
MAX_LABEL_KEYS = 3  # more differing keys than this make a legend unreadable; the rest are counted
THROUGHPUT_KEYS = ("samples_per_s", "tokens_per_s", "mfu")
FIRST_EVAL_KEYS = ("val_loss", "val_acc")


@dataclass(frozen=True)
class Run:
    """One run directory's record, read once."""

    path: Path
    recipe: dict[str, Any]  # {} for a run without plan.json (a --script run)
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    resumes: list[int]  # the steps each restart continued from
    early_stop: int | None
    preemptions: int
    summary: dict[str, Any] | None  # the last one: a finished run resumed again writes two

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def monitor(self) -> str:
        return self.recipe.get("train", {}).get("monitor", "val_loss")

    @property
    def maximize(self) -> bool:
        mode = self.recipe.get("train", {}).get("monitor_mode", "auto")
        return mode == "max" or (mode == "auto" and self.monitor.endswith("acc"))


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {METRICS}"
        raise UsageError(f"{str(run_dir)!r} {what}; give the directory of a run (runs/<name>-<stamp>)",
                         key="RUN_DIR")
    plan = run_dir / PLAN
    recipe = (json.loads(plan.read_text()).get("recipe") or {}) if plan.is_file() else {}

    def records(kind: str, read: Callable[[Path, str], list[dict[str, Any]]] = read_records) -> list[dict[str, Any]]:
        try:
            return read(run_dir, kind)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{run_dir / METRICS} line {exc.lineno}: not JSON ({exc.msg})",
                             key="RUN_DIR") from None

    summaries, early_stops = records("summary"), records("early_stop")
    # The steps a resume trained again are plotted (and their evaluations ranked) once,
    # as they stand: what was recorded past the checkpoint before the restart is gone.
    return Run(path=run_dir, recipe=recipe, train=records("train", read_resumed_records),
               eval=records("eval", read_resumed_records),
               resumes=[r["step"] for r in records("resume")],
               early_stop=early_stops[-1]["step"] if early_stops else None,
               preemptions=len(records("preempted")),
               summary=summaries[-1] if summaries else None)


# -- legends -------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def legend_labels(names: list[str], recipes: list[dict[str, Any]]) -> list[str]:
    """Each run's name with the recipe values that set it apart from the others, e.g.
    ``quick-1 (lr=0.003)``. A key is shortened to the last parts of its path that still
    tell it apart from the other differing keys (``lr``, but ``model.name`` and
    ``engine.name``). The recipe's own name is left out: the run's name carries it.
    A run without a recipe is compared with nothing."""
    flats = [flatten(r) for r in recipes if r]
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys and k != "name"]
    differing = [k for k in keys if len({_show(f[k]) if k in f else None for f in flats}) > 1]
    short = _short_keys(differing)
    labels = []
    for name, recipe in zip(names, recipes):
        flat = flatten(recipe)
        parts = [f"{short[k]}={_show(flat[k])}" for k in differing if k in flat]
        if len(parts) > MAX_LABEL_KEYS:
            parts = parts[:MAX_LABEL_KEYS] + [f"+{len(parts) - MAX_LABEL_KEYS} more"]
        labels.append(f"{name} ({', '.join(parts)})" if recipe and parts else name)
    return labels


def _short_keys(keys: list[str]) -> dict[str, str]:
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        short[key] = suffix
    return short


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


# -- the table -----------------------------------------------------------------------


def summary_table(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    return [_row(load_run(d)) for d in run_dirs]


def _row(run: Run) -> dict[str, Any]:
    """From the run's summary record; for a run without one (still going, preempted,
    killed), from its last records, so that a report mid-run shows where it stands."""
    best, best_step = _best(run)
    last_eval = run.eval[-1] if run.eval else {}
    row = {"run": run.name, "steps": None, "monitor": run.monitor, "best": best, "best_step": best_step,
           "val_loss": last_eval.get("val_loss"), "val_acc": last_eval.get("val_acc"),
           "samples_per_s": None, "seconds": None, "end": _end(run)}
    if run.summary is not None:
        row.update({k: run.summary.get(k)
                    for k in ("steps", "samples_per_s", "seconds", "val_loss", "val_acc")})
    elif run.train:
        row["steps"] = max(r["step"] for r in run.train + run.eval)
        rates = [r["samples_per_s"] for r in run.train if _finite(r.get("samples_per_s"))]
        # As the trainer's summary reads its windows (launcher/flops.py, steady_rate): the
        # median past the first, which holds the warm-up; one with an evaluation is left out.
        steady = rates[1:] or rates
        row["samples_per_s"] = statistics.median(steady) if steady else None
    return row


def _best(run: Run) -> tuple[float | None, int | None]:
    if run.summary is not None and run.summary.get("best") is not None:
        return run.summary["best"], run.summary.get("best_step")
    scored = [r for r in run.eval if _finite(r.get(run.monitor))]
    if not scored:
        return None, None
    pick = max if run.maximize else min
    best = pick(scored, key=lambda r: r[run.monitor])
    return best[run.monitor], best["step"]


def _end(run: Run) -> str:
    if run.summary is not None:
        return "stopped early" if run.summary.get("stopped_early") else "done"
    # Each requeue after a preemption writes a resume record: more preemptions than
    # resumes means the last one has not been resumed (yet).
    return "preempted" if run.preemptions > len(run.resumes) else "incomplete"


_COLUMNS = (  # row key, header, format
    ("run", "run", "{}"), ("steps", "steps", "{}"), ("monitor", "monitor", "{}"),
    ("best", "best", "{:.4f}"), ("best_step", "best step", "{}"), ("val_loss", "val_loss", "{:.4f}"),
    ("val_acc", "val_acc", "{:.4f}"), ("samples_per_s", "samples/s", "{:,.0f}"),
    ("seconds", "seconds", "{:,.1f}"), ("end", "end", "{}"))


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, the rows as text, and which columns are numbers (right-aligned)."""
    headers = [header for _, header, _ in _COLUMNS]
    text = [["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in _COLUMNS] for row in rows]
    numeric = [key not in ("run", "monitor", "end") for key, _, _ in _COLUMNS]
    return headers, text, numeric


def format_table(rows: list[dict[str, Any]]) -> str:
    headers, text, numeric = _cells(rows)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *text)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w)
                         for c, w, right in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, text)])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    headers, text, numeric = _cells(rows)
    rule = ["---:" if right else "---" for right in numeric]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, rule, *text])


# -- the plots -----------------------------------------------------------------------


def write_report(run_dirs: list[Path], out: Path) -> list[Path]:
    """Write the plots that the runs' data allows, and summary.md, into ``out``; return
    the files written. A plot no run has data for is not written, and one left there by
    an earlier report is removed, so that the folder never shows stale curves."""
    runs = [load_run(d) for d in run_dirs]
    labels = legend_labels([r.name for r in runs], [r.recipe for r in runs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, draw in _PLOTS.items():
        figure = draw(runs, labels)
        if figure is None:
            (out / file).unlink(missing_ok=True)
            continue
        figure.savefig(out / file, dpi=DPI)
        written.append(out / file)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    parts = [f"# dlaunch report: {title}", markdown_table([_row(r) for r in runs]),
             *(f"![{p.stem}]({p.name})" for p in written)]
    (out / SUMMARY).write_text("\n\n".join(parts) + "\n")
    return [*written, out / SUMMARY]


def _series(records: list[dict[str, Any]], key: str, *,
            null_is_nan: bool = False) -> tuple[list[int], list[float]]:
    """(steps, values) of the records whose ``key`` is a number; null and non-numbers
    (a grad norm the engine could not give, a per-module dict) are left out, unless
    ``null_is_nan``, where null stands for a value JSON cannot hold."""
    points = [(r["step"], math.nan if r[key] is None else float(r[key])) for r in records
              if key in r and (_number(r[key]) or (null_is_nan and r[key] is None))]
    return [s for s, _ in points], [v for _, v in points]


def ema(values: list[float], beta: float) -> list[float]:
    """The debiased exponential moving average (TensorBoard's smoothing): the first
    points are not dragged towards zero. A NaN or inf point leaves the average as it was."""
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average, weight = beta * average + (1 - beta) * value, beta * weight + (1 - beta)
        smoothed.append(average / weight if weight else math.nan)
    return smoothed


def _smoothing(points: int) -> float:
    """The EMA's beta: an average over about 2% of the run, which lags the raw curve by
    that much; none below 100 points, where lag would hide more than the noise does."""
    return min(0.98, 1 - 50 / points) if points >= 100 else 0.0


@dataclass(frozen=True)
class Panel:
    kind: str  # "train" or "eval"
    key: str
    label: str
    log: bool = False
    from_zero: bool = False  # a rate: on an axis from zero, 1% of jitter does not look like a collapse
    null_is_nan: bool = False  # the trainer logs a NaN or Inf loss as null (JSON has neither)

    def series(self, run: Run) -> tuple[list[int], list[float]]:
        return _series(getattr(run, self.kind), self.key, null_is_nan=self.null_is_nan)


def _draw(runs: list[Run], labels: list[str], title: str, panels: list[Panel], *,
          smooth: bool = False) -> Figure | None:
    """One figure, one axes per panel that some run has data for, one colour per run."""
    panels = [p for p in panels if any(p.series(r)[0] for r in runs)]
    if not panels:
        return None
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter

    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(2.0 + 4.5 * columns, 0.8 + 3.4 * rows + 0.25 * len(runs)), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    raw_drawn, nonfinite, drawn = False, False, set()
    for ax, panel in zip(axes, panels):
        dots = max(len(panel.series(r)[0]) for r in runs) <= 40
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            steps, values = panel.series(run)
            if not steps:
                continue
            drawn.add(i)
            # A line has a gap where a loss went NaN or Inf: a cross at the top says why.
            bad = [s for s, v in zip(steps, values) if not math.isfinite(v)]
            if bad:
                ax.plot(bad, [0.97] * len(bad), linestyle="none", marker="x", color=color, markersize=7,
                        markeredgewidth=2, transform=ax.get_xaxis_transform(), zorder=5)
                nonfinite = True
            beta = _smoothing(len(values)) if smooth else 0.0
            if beta:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                values, raw_drawn = ema(values, beta), True
            ax.plot(steps, values, color=color, linewidth=1.6, marker="o" if dots and not beta else None,
                    markersize=3)
            if panel.key == run.monitor:
                best, best_step = _best(run)
                if best is not None:
                    ax.plot([best_step], [best], marker="*", markersize=13, color=color,
                            markeredgecolor="black", markeredgewidth=0.6, zorder=5)
            _mark_events(ax, run, color)
        ax.set_ylabel(panel.label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel.from_zero:
            ax.set_ylim(bottom=0)
        if panel.log:
            # Plain numbers (3e-04, 2) rather than 3x10^-4, and the minor ticks labelled
            # too while the axis spans few decades: a grad norm often stays within one.
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    for ax in axes[len(panels):]:
        ax.set_visible(False)

    # One run needs no colour key (the title names it), only the key to the marks.
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=1.6, label=label)
               for i, label in enumerate(labels) if i in drawn] if len(runs) > 1 else []
    if raw_drawn:
        handles.append(Line2D([], [], color="gray", alpha=0.4, label="faint: raw, solid: smoothed (EMA)"))
    if nonfinite:
        handles.append(Line2D([], [], color="gray", marker="x", markeredgewidth=2, linestyle="none",
                              label="NaN / Inf"))
    if any(r.resumes for r in runs):
        handles.append(Line2D([], [], color="gray", linestyle=":", label="resumed"))
    if any(r.early_stop is not None for r in runs):
        handles.append(Line2D([], [], color="gray", linestyle="--", label="stopped early"))
    if any(p.key == r.monitor and _best(r)[0] is not None for p in panels for r in runs):
        handles.append(Line2D([], [], color="gray", marker="*", markersize=10, linestyle="none",
                              markeredgecolor="black", markeredgewidth=0.6, label="best (monitored)"))
    if handles:
        figure.legend(handles=handles, loc="outside lower center", fontsize="small", frameon=False,
                      ncols=1 if len(runs) > 1 else len(handles))
    figure.suptitle(f"{title}: {runs[0].name}" if len(runs) == 1 else title)
    return figure


def _mark_events(ax: Axes, run: Run, color: str) -> None:
    for step in run.resumes:
        ax.axvline(step, color=color, linestyle=":", linewidth=1.2, alpha=0.8)
    if run.early_stop is not None:
        ax.axvline(run.early_stop, color=color, linestyle="--", linewidth=1.2, alpha=0.8)


def _loss(runs: list[Run], labels: list[str]) -> Figure | None:
    return _draw(runs, labels, "training loss", [Panel("train", "loss", "loss", null_is_nan=True)],
                 smooth=True)


def _eval(runs: list[Run], labels: list[str]) -> Figure | None:
    keys = list(FIRST_EVAL_KEYS)  # first, when present: _draw leaves out what no run has
    for run in runs:
        for record in run.eval:
            keys += [k for k in record if k not in keys and k not in ("kind", "step", "time")]
    return _draw(runs, labels, "evaluation", [Panel("eval", k, k) for k in keys])


def _lr(runs: list[Run], labels: list[str]) -> Figure | None:
    # A log axis only when runs' LRs are an order of magnitude apart: a schedule's shape
    # reads best on a linear one.
    peaks = [max(values) for r in runs if (values := _series(r.train, "lr")[1]) and max(values) > 0]
    log = bool(peaks) and max(peaks) > 10 * min(peaks)
    return _draw(runs, labels, "learning rate", [Panel("train", "lr", "lr", log=log)])


def _grad_norm(runs: list[Run], labels: list[str]) -> Figure | None:
    return _draw(runs, labels, "gradient and weight norms", [Panel("train", "grad_norm", "grad norm", log=True),
                                                               Panel("train", "weight_norm", "weight norm")])


def _throughput(runs: list[Run], labels: list[str]) -> Figure | None:
    names = {"samples_per_s": "samples/s", "tokens_per_s": "tokens/s", "mfu": "MFU"}
    return _draw(runs, labels, "throughput",
                 [Panel("train", k, names[k], from_zero=True) for k in THROUGHPUT_KEYS])


_PLOTS: dict[str, Callable[[list[Run], list[str]], Figure | None]] = {
    "loss.png": _loss, "eval.png": _eval, "lr.png": _lr, "grad_norm.png": _grad_norm,
    "throughput.png": _throughput}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)
