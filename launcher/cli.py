"""`dlaunch`: the command line. Each subcommand imports what it needs when it runs, so
`dlaunch --help`, `validate` and `plan` never import torch.

Exit codes follow torchrun and sbatch: 0 success, 1 the job failed, 2 bad input,
130 interrupted (Ctrl-C), 143 stopped by SIGTERM, 129 by SIGHUP (the terminal closed).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

from launcher import __version__
from launcher.errors import EXIT_USAGE, UsageError, printable


def _add_recipe_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument("recipe", nargs="?" if optional else None, help="the recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set optim.lr=3e-4 (repeatable; typed "
                             "as YAML)")


def _add_topology_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", choices=("local", "slurm", "ray"),
                        help="where the job runs (default: cluster.backend)")
    parser.add_argument("--address", metavar="HOST:PORT",
                        help="Ray: the cluster's head (default: cluster.ray.address, RAY_ADDRESS, "
                             "or a Ray instance on this host for the command's duration)")
    parser.add_argument("--nodes", type=int, help="number of nodes (default: cluster.nodes)")
    parser.add_argument("--procs-per-node", "--nproc-per-node", dest="procs_per_node", type=int,
                        help="worker processes per node, one per GPU (default: cluster.procs_per_node)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlaunch",
        description="Turn one YAML recipe into a distributed DeepSpeed or Accelerate training job.",
        epilog="Run `dlaunch COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"dlaunch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a recipe, or launch a torchrun-style script",
                              description="Train RECIPE on the chosen topology, or with --script "
                                          "launch an ordinary torchrun-style script (arguments "
                                          "for it after `--`), and wait for the job to end.")
    submit = commands.add_parser("submit", help="like run on Slurm, but return at once with the job id")
    for command in (run, submit):
        _add_recipe_args(command, optional=True)
        _add_topology_args(command)
        command.add_argument("--script", help="a torchrun-style training script to launch instead "
                                              "of the built-in trainer")
        command.add_argument("--resume", metavar="RUN_DIR",
                             help="continue the run in RUN_DIR from its newest checkpoint that verifies")
        command.add_argument("--dry-run", action="store_true",
                             help="Slurm: print the sbatch script instead of submitting it")
        command.add_argument("--dependency", metavar="SPEC",
                             help="Slurm: sbatch --dependency, e.g. afterok:1234")
        command.add_argument("--array", action="append", default=[], metavar="KEY=[V1, V2, ...]",
                             help="Slurm: one array job over a grid of recipe values (repeatable: "
                                  "the grid is the product), each task in its own run dir")
        command.add_argument("--folds", type=int, metavar="K",
                             help="cross-validate: train every one of K folds (k-fold; stratified "
                                  "or walk-forward when the recipe's data.validation says so) and "
                                  "report each metric's mean and std (on Slurm, as an array job)")

    for name, text in (("status", "the state of a job"), ("logs", "a job's log"),
                       ("cancel", "stop a job and every process of it")):
        job = commands.add_parser(name, help=text)
        job.add_argument("job", metavar="JOB", help="a run directory, or a Slurm job id")
        if name == "logs":
            job.add_argument("--rank", type=int, help="this rank's log instead of the job's output")
            job.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    sweep = commands.add_parser(
        "sweep", help="run the recipe's sweep: section with Ray Tune, each trial a distributed job",
        description="Search the recipe's sweep: space with Ray Tune. Each trial is a full run of "
                    "the recipe on --nodes x --procs-per-node Ray workers, with its own run dir; "
                    "at the end, a table of trials, best.yaml and metric.png in the sweep dir.")
    _add_recipe_args(sweep, optional=True)
    _add_topology_args(sweep)
    sweep.add_argument("--resume", metavar="SWEEP_DIR",
                       help="continue an interrupted sweep; finished trials are not run again")

    plan = commands.add_parser("plan", help="print the launch plan without running anything")
    _add_recipe_args(plan)
    _add_topology_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    doctor = commands.add_parser(
        "doctor", help="sanity-check the recipe's model and data before a long run",
        description="Check the recipe's own model and data in this process (fp32 on CPU), as rank 0 "
                    "of the run would see them: inputs normalised, labels in range and balanced, a "
                    "gradient for every parameter, one small batch overfitted, the initial loss near "
                    "log(classes), the loader faster than the step. Exit 1 when a check fails.")
    _add_recipe_args(doctor)
    doctor.add_argument("--overfit-steps", type=int, default=200, metavar="N",
                        help="most Adam steps the overfit check takes on its batch (default: 200)")
    doctor.add_argument("--overfit-lr", type=float, metavar="LR",
                        help="the overfit check's fixed Adam learning rate (default: 3e-3)")
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.set_defaults(cluster=None, address=None, nodes=None, procs_per_node=None)

    validate = commands.add_parser("validate", help="check a recipe without running it")
    _add_recipe_args(validate)
    _add_topology_args(validate)

    lr_find = commands.add_parser(
        "lr-find", help="the LR range test: sweep the LR on the recipe's own model, data and engine",
        description="Train the recipe in this one process (world size 1, the recipe's global batch by "
                    "gradient accumulation) for --steps optimizer steps while the LR grows exponentially "
                    "from --min-lr to --max-lr, stop once the smoothed loss diverges, and suggest an LR: "
                    "a tenth of the LR at the smoothed loss's minimum. Writes lr_find.png and lr_find.json to "
                    "RUN_ROOT/<name>-lr-find-<stamp>/.")
    _add_recipe_args(lr_find)
    lr_find.add_argument("--min-lr", type=float, default=1e-7, metavar="LR",
                         help="the first LR of the sweep (default: 1e-7)")
    lr_find.add_argument("--max-lr", type=float, default=10.0, metavar="LR",
                         help="the last LR of the sweep (default: 10)")
    lr_find.add_argument("--steps", type=int, default=100, metavar="N",
                         help="optimizer steps of the sweep (default: 100)")
    lr_find.add_argument("--apply", metavar="OUT.yaml",
                         help="also write the recipe (with its --set overrides) with optim.lr set to the "
                              "suggestion (to what optim.reference_batch scaling turns into it)")

    evaluate = commands.add_parser(
        "eval", help="score a finished run's final weights, or its snapshot ensemble, on a split",
        description="Score RUN_DIR's final weights (model.pt) on one of its splits, in this process; with "
                    "--ensemble, also each snapshot and their ensemble. "
                    "The test split (data.test_fraction) is read by this command only.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--split", choices=("val", "test"), default="val",
                          help="the split to score (default: val)")
    evaluate.add_argument("--ensemble", action="store_true",
                          help="score each snapshot of the run (schedule.snapshots), the final weights, and "
                               "the average of the snapshots' softmax probabilities")
    evaluate.add_argument("--last", type=int, metavar="K",
                          help="with --ensemble: average the last K snapshots only (default: all)")

    report = commands.add_parser(
        "report", help="plot runs (loss, eval, LR, grad norm, throughput) and tabulate them",
        description="Plot one run, or several overlaid, and print a summary table. One run's report "
                    "goes to RUN_DIR/report/ (every run also writes it when it ends), several runs' to --out.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", metavar="DIR", help="where the PNGs and summary.md go (default: "
                                                     "RUN_DIR/report for one run, ./report for several)")

    export = commands.add_parser(
        "export", help="export a finished run's final weights to ONNX (fp32, int8, pruned), each scored",
        description="Write RUN_DIR/export/: model.onnx (float32), model.int8.onnx (int8 weights), "
                    "model.pruned.onnx (Linear/Conv weights magnitude-pruned) and report.json: each variant "
                    "scored on the run's validation split with onnxruntime and timed on one CPU thread.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    export.add_argument("--prune", type=float, default=0.5,
                        help="share of the Linear/Conv weights zeroed in model.pruned.onnx (default: 0.5)")
    export.add_argument("--batch-size", type=int, default=256, help="rows per scoring batch (default: 256)")

    data = commands.add_parser("data", help="prepare a dataset as Parquet shards, or check them")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = data_commands.add_parser(
        "prepare", help="an image folder, a CSV or a NumPy .npz (x, y) as Parquet shards with a manifest",
        description="Write SRC (a folder of class folders of JPEG/PNG, a CSV file, or an .npz with "
                    "arrays x and y) as OUT/part-NNNNN.parquet shards and OUT/_manifest.json (rows, "
                    "columns, class counts, each shard's size and sha256). OUT appears complete or "
                    "not at all. Train on it with data.source: parquet, data.path: OUT.")
    prepare.add_argument("source", metavar="SRC")
    prepare.add_argument("out", metavar="OUT")
    prepare.add_argument("--label-column", default="label", help="the CSV's label column (default: label)")
    prepare.add_argument("--rows-per-shard", type=int, default=8192, help="rows per file (default: 8192)")
    prepare.add_argument("--row-group-rows", type=int, default=1024,
                         help="rows per Parquet row group, the unit a rank reads (default: 1024)")
    prepare.add_argument("--seed", type=int,
                         help="shuffle the rows with this seed first (default: keep the source order)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an OUT written by an earlier prepare")
    verify = data_commands.add_parser("verify", help="check shards against their manifest (sizes, sha256, rows)")
    verify.add_argument("out", metavar="OUT")

    explain = commands.add_parser("explain", help="document a recipe key, e.g. optim.scaling")
    explain.add_argument("key")
    return parser


def _split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first `--` belongs to the user's script."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def _make_plan(args: argparse.Namespace, script_args: list[str], stamp: str, fold: int | None = None):
    """The plan, and where each recipe key came from (for errors found later); for a
    fold of --folds, in the folds' directory."""
    from launcher.data.facts import describe
    from launcher.folds import fold_run_dir
    from launcher.host import detect_host
    from launcher.models.facts import model_facts
    from launcher.models.target import check_target_importable
    from launcher.plan import build_plan
    from launcher.recipe import load_recipe, locate
    from launcher.rundir import new_run_dir, run_root
    from launcher.sinks import check_installed

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.ray.address={json.dumps(args.address)}")
    recipe, source = load_recipe(args.recipe, overrides)
    script = getattr(args, "script", None)
    try:
        data = model = target_params = uncounted = None
        if script is None:
            data = describe(recipe.data)
            if recipe.model.target is not None:
                check_target_importable(recipe.model.target)
            check_installed(recipe.logging)
            model = model_facts(recipe, data)
            if recipe.model.target is not None:
                target_params, uncounted = _count_target(recipe, data)
        elif not Path(script).is_file():
            raise UsageError(f"script {script!r} does not exist", key="--script")
        root = run_root(recipe, args.cluster or recipe.cluster.backend)
        run_dir = new_run_dir(root, recipe.name, stamp) if fold is None else \
            fold_run_dir(new_run_dir(root, recipe.name, f"{stamp}-folds"), fold)
        plan = build_plan(recipe, host=detect_host(), data=data, run_dir=str(run_dir),
                          backend=args.cluster, nodes=args.nodes, procs_per_node=args.procs_per_node,
                          script=str(Path(script).resolve()) if script else None,
                          script_args=script_args, model=model, target_params=target_params,
                          user_env=os.environ)
        if uncounted:  # said once the plan stands: bad input stays one line
            print(uncounted, file=sys.stderr)
        return plan, source
    except UsageError as err:
        raise locate(err, source) from None


def _count_target(recipe, data) -> tuple[int | None, str | None]:
    """A ``model.target`` model's parameters, for the plan's memory estimate: built on the
    meta device, the one time planning runs the user's code. When it cannot be built there,
    no count but a line that says why; the workers build it for real and report any error,
    as before."""
    from launcher.models.counts import count_on_meta

    try:
        with contextlib.redirect_stdout(sys.stderr):  # whatever it prints, not into `plan --json`
            return count_on_meta(recipe.model, data), None
    except Exception as exc:  # the user's code: anything
        reason = exc.message if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
        return None, printable(f"dlaunch: no memory estimate: {recipe.model.target} could not be built on "
                               f"the meta device to count its parameters ({reason[:300]})")


def _cmd_validate(args: argparse.Namespace, _: list[str]) -> int:
    _make_plan(args, [], "validate")
    print(f"{args.recipe}: ok")
    return 0


def _cmd_lr_find(args: argparse.Namespace, _: list[str]) -> int:
    from launcher import lr_find
    from launcher.host import detect_host
    from launcher.recipe import locate

    settings = lr_find.SweepSettings(args.min_lr, args.max_lr, args.steps)
    settings.check()
    if args.apply:
        _check_apply_target(Path(args.apply), Path(args.recipe))
    # The recipe planned as `dlaunch run` would launch it on this host: the range test
    # keeps its global batch, and --apply undoes its LR scaling.
    planned = argparse.Namespace(**vars(args), cluster="local", address=None, nodes=None, procs_per_node=None)
    plan, source = _make_plan(planned, [], f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        test_plan = lr_find.one_process_plan(plan, source, settings, detect_host(), os.environ)
    except UsageError as err:
        raise locate(err, source) from None
    try:
        curve = lr_find.run_sweep(test_plan, settings)
    except KeyboardInterrupt:
        print("dlaunch: lr-find interrupted; nothing written", file=sys.stderr)
        return 130
    suggestion = lr_find.suggestion_of(curve, settings)
    run_dir = Path(plan.run_dir)
    lr_find.write_result(run_dir, plan, test_plan, settings, curve, suggestion)
    applied = ""
    if args.apply:
        lr = lr_find.recipe_lr(plan, suggestion.lr)
        _write_applied(Path(args.apply), Path(args.recipe), args.overrides, lr)
        applied = f", recipe {args.apply} (optim.lr {lr:.3g})"
    stopped = f" (stopped early: {curve.stopped})" if curve.stopped else ""
    print(f"dlaunch: lr-find: suggested LR {suggestion.lr:.3g} after {len(curve.lrs)} steps{stopped}; "
          f"plot {run_dir / lr_find.PLOT}, curve {run_dir / lr_find.CURVE}{applied}")
    return 0


def _check_apply_target(out: Path, recipe: Path) -> None:
    """Before the sweep: --apply writes a new file, never the recipe it read, into a
    folder that exists."""
    if out.resolve() == recipe.resolve():
        raise UsageError(f"{str(out)!r} is the recipe being measured; write the result to a new file",
                         key="--apply")
    if not out.parent.is_dir():
        raise UsageError(f"folder {str(out.parent)!r} does not exist", key="--apply")


def _write_applied(out: Path, recipe: Path, overrides: list[str], lr: float) -> None:
    """The recipe as measured, in its own words: the file with the --set overrides and
    optim.lr written in (see yamlio.with_values)."""
    from launcher.rundir import write_atomic
    from launcher.yamlio import parse_override, with_values

    values = [parse_override(spec) for spec in overrides] + [(("optim", "lr"), float(f"{lr:.3g}"))]
    write_atomic(out, with_values(recipe.read_text(), values))


def _cmd_plan(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.plan import format_plan

    plan, _ = _make_plan(args, [], time.strftime("%Y%m%d-%H%M%S"))
    print(plan.to_json() if args.json else format_plan(plan), end="\n" if not args.json else "")
    return 0


def _cmd_doctor(args: argparse.Namespace, _: list[str]) -> int:
    if args.overfit_steps < 1:
        raise UsageError(f"{args.overfit_steps} steps; give at least 1", key="--overfit-steps")
    if args.overfit_lr is not None and not args.overfit_lr > 0:
        raise UsageError(f"{args.overfit_lr} is not a learning rate; give a positive one", key="--overfit-lr")
    from launcher.doctor import format_results, results_json, run_doctor, verdict_of
    from launcher.recipe import locate

    plan, source = _make_plan(args, [], "doctor")
    started = time.perf_counter()
    try:
        results = run_doctor(plan, overfit_steps=args.overfit_steps, overfit_lr=args.overfit_lr)
    except UsageError as err:  # the data or the model, found bad once read or built
        raise locate(err, source) from None
    seconds = time.perf_counter() - started
    print(results_json(results, seconds, args.recipe) if args.json else format_results(results, seconds),
          end="" if args.json else "\n")
    return 1 if verdict_of(results) == "FAIL" else 0


def _cmd_eval(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.evaluate import evaluate_run

    if args.last is not None and not args.ensemble:
        raise UsageError("it counts the snapshots --ensemble averages; add --ensemble", key="--last")
    if args.ensemble:
        from launcher.ensemble import evaluate_ensemble, format_table

        result = evaluate_ensemble(Path(args.run_dir), args.split, last=args.last)
        print(format_table(result))
        print(f"dlaunch: {result['rows']} {args.split} rows; scores in "
              f"{Path(args.run_dir) / f'eval-{args.split}-ensemble.json'}", file=sys.stderr)
        return 0
    scores = evaluate_run(Path(args.run_dir), args.split)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "rows")
    print(f"{metrics} on {scores['rows']} {args.split} rows of {args.run_dir}")
    return 0


def _cmd_report(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.report import format_table, summary_table, write_report

    run_dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report"))
    written = write_report(run_dirs, out)
    print(format_table(summary_table(run_dirs)))
    print(f"dlaunch: report in {out}: {', '.join(p.name for p in written)}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.export import ExportMismatchError, export_run, format_report

    try:
        report = export_run(Path(args.run_dir), opset=args.opset, prune=args.prune, batch_size=args.batch_size)
    except ExportMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


_PREPARE_KEYS = {"source": "SRC", "out": "OUT", "label_column": "--label-column",
                 "rows_per_shard": "--rows-per-shard", "row_group_rows": "--row-group-rows"}


def _cmd_data(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.data.prepare import prepare, verify

    if args.data_command == "verify":
        problems = verify(args.out)
        for problem in problems:
            print(f"{args.out}: {problem}", file=sys.stderr)
        print(f"{args.out}: {'damaged' if problems else 'ok'}")
        return 1 if problems else 0
    try:
        manifest = prepare(args.source, args.out, label_column=args.label_column,
                           rows_per_shard=args.rows_per_shard, row_group_rows=args.row_group_rows,
                           seed=args.seed, overwrite=args.overwrite)
    except UsageError as err:
        err.key = _PREPARE_KEYS.get(err.key or "", err.key)
        raise
    print(f"{args.out}: {manifest.rows} rows in {len(manifest.shards)} shards")
    return 0


def _cmd_explain(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.recipe import explain

    print(explain(args.key))
    return 0


def _resumed_plans(target: str) -> tuple[list, Path | None]:
    """The plan of the run directory ``target``; or, for the directory of a `--folds`
    run, those of its folds, and that directory."""
    from launcher.folds import fold_run_dirs
    from launcher.plan import LaunchPlan
    from launcher.rundir import PLAN

    plan_file = Path(target) / PLAN
    folds = [] if plan_file.exists() else fold_run_dirs(Path(target))
    if folds:
        return [(LaunchPlan.from_json((run_dir / PLAN).read_text()), None) for run_dir in folds], Path(target)
    try:
        return [(LaunchPlan.from_json(plan_file.read_text()), None)], None
    except FileNotFoundError:
        raise UsageError(f"{str(plan_file)!r} does not exist; is {target!r} a dlaunch run "
                         "directory?", key="--resume") from None


def _grid(specs: list[str]) -> list[list[str]]:
    """`--array optim.lr=[1e-3, 3e-3] --array train.seed=[1, 2]` -> the overrides of
    each of the 4 grid points."""
    from launcher.yamlio import parse_override

    axes = []
    for spec in specs:
        keys, values = parse_override(spec)
        if not isinstance(values, list) or not values:
            raise UsageError(f"{spec!r}: give the values as a list, e.g. optim.lr=[1e-3, 3e-3]",
                             key="--array")
        axes.append([f"{'.'.join(keys)}={json.dumps(value)}" for value in values])
    return [list(point) for point in itertools.product(*axes)]


def _run_plans(args: argparse.Namespace, script_args: list[str]) -> tuple[list, Path | None]:
    """The plans to launch (one, one per grid point of --array, or one per fold) with the
    source map of each one's recipe (None when resuming); and for folds, their directory."""
    if args.resume:
        if (args.recipe or args.overrides or args.script or args.nodes or args.procs_per_node
                or args.cluster or args.array or args.address or args.folds):
            raise UsageError("--resume takes the run's own plan; give no recipe, --set, --array, "
                             "--folds, --script, --cluster, --address or topology flags with it",
                             key="--resume")
        return _resumed_plans(args.resume)
    if args.recipe is None and args.script is None:
        raise UsageError("give a recipe to train, or --script to launch", key=args.command)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.folds is not None:
        planned = _fold_plans(args, stamp)
        return planned, Path(planned[0][0].run_dir).parent
    if not args.array:
        return [_make_plan(args, script_args, stamp)], None
    return [_make_plan(argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *point]}),
                       script_args, f"{stamp}-a{index}")
            for index, point in enumerate(_grid(args.array))], None


def _fold_plans(args: argparse.Namespace, stamp: str) -> list:
    from launcher.folds import fold_overrides
    from launcher.recipe import load_recipe

    if args.script or args.array:
        raise UsageError("--folds trains the recipe once per fold; it takes no --script or --array",
                         key="--folds")
    if args.recipe is None:
        raise UsageError("--folds needs a recipe", key="--folds")
    data = load_recipe(args.recipe, args.overrides)[0].data
    planned = []
    for fold in range(args.folds):
        fold_args = argparse.Namespace(**{**vars(args), "overrides": [
            *args.overrides, *fold_overrides(data, args.folds, fold)]})
        try:
            planned.append(_make_plan(fold_args, [], stamp, fold))
        except UsageError as err:
            if err.key in ("data.folds", "data.fold", "data.validation") and err.origin == "--set":
                err.origin = "--folds"  # the overrides are ours: name the flag the user gave
            raise
    return planned


def _create_run_dirs(planned: list) -> None:
    """All or none: a failure removes the run dirs this call already made. None is made
    on a file system without room for a checkpoint (launcher/disk_room.py)."""
    import shutil

    from launcher import disk_room, rundir
    from launcher.plan import checkpoint_size
    from launcher.recipe import locate

    # Grid points may differ in their model: the largest one's checkpoint must fit.
    largest, source = max(planned, key=lambda entry: checkpoint_size(entry[0]) or 0)
    try:
        disk_room.refuse_without_room(largest, resuming=False)
    except UsageError as err:
        raise locate(err, source) from None
    if line := disk_room.short_of_room([plan for plan, _ in planned]):
        print(line, file=sys.stderr)
    made = []
    for plan, source in planned:
        try:
            rundir.create(plan, sys.argv)
        except UsageError as err:
            for run_dir in made:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise locate(err, source) from None
        made.append(plan.run_dir)
    for run_dir in made:
        print(f"dlaunch: run dir {run_dir}", file=sys.stderr)


_STOPPED_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP}
"""A job stopped by Ctrl-C, SIGTERM (or `dlaunch cancel` on Ray) or a hangup."""


def _launch(plans: list, args: argparse.Namespace, folds_dir: Path | None) -> int:
    """Hand the plans to their backend; wait for the jobs unless this is `submit`. Here,
    and on Ray, the plans (folds) run one after another, up to the first that fails, and
    a stop, or a failed fold, ends with the command that continues them; on Slurm,
    several are one array job."""
    if plans[0].topology.backend in ("local", "ray"):
        for index, plan in enumerate(plans):
            code = _launch_here(plan, args)
            if code in _STOPPED_CODES:
                print(_stopped_line(code, plans[index:], folds_dir), file=sys.stderr)
            elif code != 0 and folds_dir is not None:
                print(_failed_folds_line([plan], plans[index:], folds_dir), file=sys.stderr)
            if code != 0:
                return code
        return 0
    from cluster.slurm import SlurmBackend

    backend = SlurmBackend([f"--dependency={args.dependency}"] if args.dependency else [])
    jobs = backend.submit_array(plans) if len(plans) > 1 else [backend.submit(plans[0])]
    for job in jobs:
        print(f"dlaunch: Slurm job {job.job_id}: {job.run_dir}", file=sys.stderr)
    if args.command == "submit":
        print("\n".join(job.job_id for job in jobs))
        return 0
    try:
        code = max(job.wait() for job in jobs)
    except KeyboardInterrupt:  # the job is Slurm's: Ctrl-C stops the wait, as `ray job submit`'s does
        print(_still_running_line(jobs), file=sys.stderr)
        return 128 + signal.SIGINT
    failed = [plan for plan in plans if _finished(plan) is None] if code and folds_dir else []
    if failed:  # the array's tasks end each on its own
        print(_failed_folds_line(failed, failed, folds_dir), file=sys.stderr)
    return code


def _still_running_line(jobs: list) -> str:
    import shlex

    if len(jobs) > 1:
        array = jobs[0].job_id.split("_")[0]
        return (f"dlaunch: stopped waiting; Slurm array job {array} keeps running: `dlaunch status "
                f"RUN_DIR` for each task, `scancel {array}` ends it")
    run_dir = shlex.quote(jobs[0].run_dir)
    return (f"dlaunch: stopped waiting; Slurm job {jobs[0].job_id} keeps running: `dlaunch logs -f "
            f"{run_dir}` follows it, `dlaunch cancel {run_dir}` ends it")


def _launch_here(plan, args: argparse.Namespace) -> int:
    if plan.topology.backend == "local":
        from cluster.local import LocalBackend

        code = LocalBackend().submit(plan).wait()
    else:
        code = _launch_on_ray(plan, resumed=bool(args.resume))
    if code and plan.recipe.logging.mlflow.enabled:
        from launcher.sinks.mlflow import end_left_running

        end_left_running(plan, stopped=code in _STOPPED_CODES)
    return code


def _stopped_line(code: int, rest: list, folds_dir: Path | None) -> str:
    """The stop line of ``rest[0]``, the run that stopped; ``rest`` also holds the folds
    that were to follow it."""
    from cluster.failure import resume_point, stopped_line

    if folds_dir is None:
        return stopped_line(code, rest[0].run_dir, f"from {resume_point(rest[0].run_dir)}")
    return stopped_line(code, str(folds_dir), f"with {_fold_order(rest)}")


def _failed_folds_line(failed: list, rest: list, folds_dir: Path) -> str:
    """The line that ends a run whose folds ``failed``, and says how a resume continues
    ``rest``, the folds left: dlaunch: fold 0 failed; `dlaunch run --resume DIR` continues
    the folds with fold 0 from checkpoint step-…, then folds 1, 2"""
    import shlex

    from launcher.folds import fold_number

    numbers = ", ".join(str(fold_number(plan.run_dir)) for plan in failed)
    return (f"dlaunch: fold{'s' if len(failed) > 1 else ''} {numbers} failed; `dlaunch run --resume "
            f"{shlex.quote(str(folds_dir))}` continues the folds with {_fold_order(rest)}")


def _fold_order(plans: list) -> str:
    """What resuming these folds does: `fold 1 from checkpoint step-00000005, then folds 2, 3`."""
    from cluster.failure import resume_point
    from launcher.folds import fold_number

    first, *later = [fold_number(plan.run_dir) for plan in plans]
    order = f"fold {first} from {resume_point(plans[0].run_dir)}"
    if later:
        order += f", then fold{'s' if len(later) > 1 else ''} {', '.join(map(str, later))}"
    return order


def _launch_on_ray(plan, *, resumed: bool) -> int:
    import shutil

    from cluster.ray import RayBackend, connected, node_bundles, ray_address

    cpus = sum(bundle.get("CPU", 0) for bundle in node_bundles(plan))
    with connected(ray_address(plan), cpus_needed=cpus):
        try:
            job = RayBackend().submit(plan)
        except UsageError:
            if not resumed:  # nothing ran: leave nothing behind
                shutil.rmtree(plan.run_dir, ignore_errors=True)
            raise
        print(f"dlaunch: Ray job {job.job_id}: {job.run_dir}", file=sys.stderr)
        return job.wait()


def _cmd_run(args: argparse.Namespace, script_args: list[str]) -> int:
    planned, folds_dir = _run_plans(args, script_args)
    plans = [plan for plan, _ in planned]
    slurm = plans[0].topology.backend == "slurm"
    if args.command == "submit" and not slurm:
        raise UsageError("submit hands a job to Slurm; add --cluster slurm", key="--cluster")
    if args.address and plans[0].topology.backend != "ray":
        raise UsageError("--address is for --cluster ray", key="--address")
    if (args.dry_run or args.dependency or args.array) and not slurm:
        raise UsageError("--dry-run, --dependency and --array are for --cluster slurm", key="--cluster")
    if args.resume:
        plans = _left_to_resume(plans, folds_dir, dry_run=args.dry_run)
    if args.dry_run:
        from cluster.slurm import render

        if plans:  # a resume's script runs only what is left
            print(render(plans[0], array=plans if len(plans) > 1 else []), end="")
        return 0
    if not args.resume:
        _create_run_dirs(planned)
    code = _launch(plans, args, folds_dir) if plans else 0
    if folds_dir is not None and code == 0 and args.command == "run":
        from launcher.folds import fold_run_dirs, format_summary, summarize

        print(format_summary(summarize(fold_run_dirs(folds_dir))))
    return code


def _left_to_resume(plans: list, folds_dir: Path | None, *, dry_run: bool) -> list:
    """The runs a `--resume` continues, said on one line: not those that finished, and
    none while any of them still runs (refused). A dry run, which starts nothing, only
    says when nothing is left."""
    finished = [_finished(plan) for plan in plans]
    left = [plan for plan, done in zip(plans, finished) if done is None]
    if left and dry_run:
        return left
    for plan in left:
        _refuse_a_running_run(plan)
    if left:
        from launcher.disk_room import refuse_without_room

        refuse_without_room(left[0], resuming=True)
    if folds_dir is None:
        print(finished[0] or f"dlaunch: resuming {plans[0].run_dir}", file=sys.stderr)
    elif left:
        print(f"dlaunch: resuming {folds_dir}: {_fold_order(left)}", file=sys.stderr)
    else:
        print(f"dlaunch: {folds_dir}: all {len(plans)} folds finished; nothing to resume", file=sys.stderr)
    return left


def _finished(plan) -> str | None:
    """`dlaunch: RUN_DIR finished ...` when the trainer ran the run to its end (its last
    record, the summary, is written): a resume would only train nothing and record a
    second, empty summary. None for a run to resume, and for a --script, whose own
    checkpoints dlaunch does not know."""
    from launcher.monitor import read_records

    summaries = read_records(Path(plan.run_dir), "summary") if plan.script is None else []
    if not summaries:
        return None
    how = "stopped early" if summaries[-1].get("stopped_early") else "done"
    return f"dlaunch: {plan.run_dir} finished at step {summaries[-1]['step']} ({how}); nothing to resume"


def _refuse_a_running_run(plan) -> None:
    """Before anything starts: a run whose ranks still run (another `dlaunch run`, a
    Slurm or Ray job), or whose Slurm job is still queued, is not resumed beside them."""
    from cluster.failure import running_ranks

    running = running_ranks(plan.run_dir, plan.topology.world_size)
    if running:
        raise UsageError(f"{plan.run_dir} is running: rank {running[0]}'s process holds "
                         f"logs/rank-{running[0]}.lock; stop that run first", key="--resume")
    if plan.topology.backend == "slurm":
        import shlex

        from cluster.slurm import unfinished_job

        job = unfinished_job(plan)
        if job is not None:
            raise UsageError(f"{plan.run_dir} is still Slurm job {job[0]}'s ({job[1]}); wait for it "
                             f"to end, or `dlaunch cancel {shlex.quote(plan.run_dir)}`", key="--resume")


def _find_job(target: str):
    """The job a run directory or a Slurm job id names."""
    from launcher.rundir import RAY_JOB

    if (Path(target) / RAY_JOB).is_file():
        from cluster.ray import RayJobRecord

        return RayJobRecord(target)
    from cluster.slurm import find_job

    return find_job(target)


def _cmd_status(args: argparse.Namespace, _: list[str]) -> int:
    job = _find_job(args.job)
    print(f"{job.job_id} {job.status()} {job.run_dir}")
    return 0


def _cmd_logs(args: argparse.Namespace, _: list[str]) -> int:
    job = _find_job(args.job)
    printed = 0
    while True:
        # The state before the read: once the job has ended, this read is its last.
        going_on = args.follow and job.status() in ("PENDING", "RUNNING")
        text = job.logs(args.rank) if args.rank is not None else job.output()
        print(text[printed:], end="", flush=True)
        printed = len(text)
        if not going_on:
            return 0
        time.sleep(1)


def _cmd_cancel(args: argparse.Namespace, _: list[str]) -> int:
    job = _find_job(args.job)
    job.cancel()
    print(f"{job.job_id} cancelled")
    return 0


def _sweep_plans(recipe, source, spec, sweep_dir: Path, args: argparse.Namespace) -> list:
    """A trial plan for the recipe as it is and for every value and bound of the space,
    so that a value no trial could run with is refused before any trial starts."""
    from launcher.data.facts import describe
    from launcher.host import detect_host
    from launcher.models.facts import model_facts
    from launcher.plan import build_plan
    from launcher.recipe import recipe_from_data
    from launcher.yamlio import apply_override, parse_override

    host = detect_host()
    probe = str(sweep_dir / "trials" / "probe")

    def plan(trial_recipe):
        data = describe(trial_recipe.data)
        return build_plan(trial_recipe, host=host, data=data, run_dir=probe, backend="ray", nodes=args.nodes,
                          procs_per_node=args.procs_per_node, model=model_facts(trial_recipe, data))

    plans = [plan(recipe)]
    base = recipe.model_dump(mode="json")
    for dim in spec.dimensions:
        values = dim.values if dim.values is not None else dim.extremes
        for value in values:
            data = json.loads(json.dumps(base))
            apply_override(data, *parse_override(f"{dim.key}={json.dumps(value)}"))
            try:
                plans.append(plan(recipe_from_data(data, source)))
            except UsageError as err:
                raise UsageError(f"value {value!r}: {err.key}: {err.message}", key=f"sweep.space.{dim.key}",
                                 line=source.lines.get(("sweep", "space", dim.key))) from None
    return plans


def _create_sweep_dir(sweep_dir: Path, recipe, plans: list) -> None:
    """recipe.yaml and sweep.json, all or nothing (like a run dir)."""
    import shutil

    from launcher.plan import user_env
    from launcher.rundir import RECIPE, write_durably
    from launcher.yamlio import dump_yaml

    staging = sweep_dir.with_name(f".{sweep_dir.name}.tmp")
    topology = plans[0].topology
    try:
        (staging / "trials").mkdir(parents=True)
        write_durably(staging / RECIPE, dump_yaml(recipe.model_dump(mode="json")))
        write_durably(staging / "sweep.json", json.dumps(
            {"nodes": topology.nodes, "procs_per_node": topology.procs_per_node, "cwd": os.getcwd(),
             "command": sys.argv, "user_env": user_env(os.environ)}, indent=2) + "\n")
        os.rename(staging, sweep_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UsageError(f"cannot create sweep directory {str(sweep_dir)!r}: {exc.strerror or exc}",
                         key="logging.run_root") from None
    print(f"dlaunch: sweep dir {sweep_dir}", file=sys.stderr)


def _cmd_sweep(args: argparse.Namespace, _: list[str]) -> int:
    from launcher.recipe import load_recipe, locate
    from launcher.rundir import RECIPE, new_run_dir, run_root
    from launcher.sinks import check_installed
    from launcher.sweep import parse_sweep

    if args.cluster == "local":
        raise UsageError("a sweep's trials run on Ray: --cluster ray (the default), or slurm for a "
                         "Ray cluster started across a Slurm allocation", key="--cluster")
    if args.cluster == "slurm" and (args.resume or args.address):
        raise UsageError("a sweep on Slurm starts its own Ray and resumes itself when requeued; give "
                         "no --resume or --address with --cluster slurm", key="--cluster")
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.ray.address={json.dumps(args.address)}")
    if args.resume:
        if args.recipe or args.overrides or args.nodes or args.procs_per_node:
            raise UsageError("--resume continues the sweep as it was planned; give no recipe, --set or "
                             "topology flags with it", key="--resume")
        sweep_dir = Path(args.resume).absolute()
        if not (sweep_dir / "sweep.json").is_file():
            raise UsageError(f"{str(sweep_dir)!r} is not a sweep directory (it has no sweep.json)",
                             key="--resume")
        settings = json.loads((sweep_dir / "sweep.json").read_text())
        args.nodes, args.procs_per_node = settings["nodes"], settings["procs_per_node"]
        recipe, source = load_recipe(sweep_dir / RECIPE, overrides)
    else:
        if args.recipe is None:
            raise UsageError("give the recipe whose sweep: section to run", key="sweep")
        recipe, source = load_recipe(args.recipe, overrides)
        sweep_dir = new_run_dir(run_root(recipe, "ray"), f"{recipe.name}-sweep",
                                time.strftime("%Y%m%d-%H%M%S"))
    spec = parse_sweep(recipe, source, recipe.model_dump(mode="json"))
    try:
        check_installed(recipe.logging)
        plans = _sweep_plans(recipe, source, spec, sweep_dir, args)
        from cluster.tune import horizon, run_sweep
        from cluster.tune_space import trial_scheduler

        trial_scheduler(spec, horizon(plans))  # refuses settings the trials' length rules out
        if not args.resume:  # room for the checkpoint of the largest model the space holds
            from launcher.disk_room import refuse_without_room
            from launcher.plan import checkpoint_size

            refuse_without_room(max(plans, key=lambda plan: checkpoint_size(plan) or 0), resuming=False)
    except UsageError as err:
        raise locate(err, source) from None
    if not args.resume:
        _create_sweep_dir(sweep_dir, recipe, plans)
    if args.cluster == "slurm":
        return _submit_sweep(recipe, spec, sweep_dir, plans[0].topology.nodes)
    return run_sweep(sweep_dir, spec, plans)


def _submit_sweep(recipe, spec, sweep_dir: Path, nodes_per_trial: int) -> int:
    """One Slurm job holding a Ray cluster big enough for max_concurrent trials at once,
    whose batch shell runs `dlaunch sweep --resume SWEEP_DIR` against it."""
    from cluster.slurm_ray import OUTPUT, submit_sweep

    job_id = submit_sweep(recipe, sweep_dir, nodes_per_trial * (spec.max_concurrent or 1))
    print(f"dlaunch: Slurm job {job_id} runs the sweep; its output: "
          f"{sweep_dir / OUTPUT.replace('%j', job_id)}", file=sys.stderr)
    print(job_id)
    return 0


_COMMANDS = {"run": _cmd_run, "submit": _cmd_run, "plan": _cmd_plan, "doctor": _cmd_doctor,
             "validate": _cmd_validate, "lr-find": _cmd_lr_find, "explain": _cmd_explain, "eval": _cmd_eval,
             "data": _cmd_data,
             "report": _cmd_report, "export": _cmd_export, "status": _cmd_status, "logs": _cmd_logs, "cancel": _cmd_cancel,
             "sweep": _cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, script_args = _split_script_args(argv)
    args = _parser().parse_args(own)
    try:
        return _COMMANDS[args.command](args, script_args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C ends a wait (`logs -f`) as it ends `tail -f`: no traceback
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
