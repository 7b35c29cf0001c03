"""The training loop every rank runs: read it top to bottom.

    resume from the newest checkpoint that verifies, if the run has one
    for each optimizer step:
        the step's micro-batches -> engine.train_step (accumulation, clipping, step)
        gather the loss of every rank (the NaN/Inf guard, and the logged loss)
        log / evaluate / early-stop / checkpoint on their schedules
    save the final weights, print a summary

Data order is a function of (seed, epoch) and the position in an epoch a function of
the step, so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from launcher import checkpoint, preemption, tune_gate
from launcher.alerts import Alerts
from launcher.data.augment import mix_batch
from launcher.data.datasets import Split, load_split
from launcher.data.loaders import Batch, eval_batches, train_batches
from launcher.data.stream_rows import streamed_split
from launcher.engines.base import Engine, StepResult, monitor_mode, sample_scores
from launcher.engines.imports import import_engine
from launcher.engines.module_stats import ActivationRecorder, recording_activations
from launcher.faults import Faults
from launcher.flops import RateWindows, Throughput, peak_flops, training_flops_per_sample
from launcher.models.build import build_model
from launcher.models.transfer import Transfer, load_initial_weights
from launcher.monitor import MetricsLog, Progress
from launcher.plan import LaunchPlan
from launcher.profiling import StepProfiler
from launcher.progress import RankProgress
from launcher.snapshots import SnapshotWriter
from launcher.watchdog import Watchdog, process_group_timeout

log = logging.getLogger("launcher.trainer")
SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's CPU shared-memory all-reduce (ShareMemCommBuilder.NAME)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def create_engine(plan: LaunchPlan, model: torch.nn.Module, groups: list[dict]) -> Engine:
    """Build the engine to train ``groups`` of ``model``'s parameters; this joins the
    process group."""
    engine = import_engine(plan)
    if plan.training.engine.name == "deepspeed":
        import deepspeed

        if plan.topology.device == "cpu":
            # On the CPU, DeepSpeed's comm backend compiles (a JIT build of about 100 s
            # of CPU on an environment's first run) and starts a shared-memory op that
            # serves only inference_all_reduce, which ZeRO training never calls: its
            # collectives are torch.distributed's. Marked incompatible, it is skipped.
            deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        deepspeed.init_distributed(dist_backend=plan.topology.dist_backend,
                                   timeout=process_group_timeout(plan))
    return engine(plan, model, groups)


def collective_device(plan: LaunchPlan) -> torch.device:
    """Where a tensor must be for a collective: NCCL reduces CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if plan.topology.dist_backend == "nccl" \
        else torch.device("cpu")


def run_training(plan: LaunchPlan) -> None:
    rank = int(os.environ["RANK"])  # torchrun's: the process group does not exist yet
    progress = RankProgress(plan.run_dir, rank)
    progress.clear()
    split, model, transfer = load_data_and_model(plan)
    throughput = _throughput(plan, model)  # counted on the whole model, before ZeRO-3 shards it
    with Watchdog(plan, rank, progress):
        # From here on ranks wait for each other: the process group, the engine's first
        # broadcasts, a resume.
        progress.mark(1, "start")
        engine, split = start_engine(plan, model, transfer, split)
        Trainer(plan, engine, split, throughput, transfer, progress).fit()


def load_data_and_model(plan: LaunchPlan) -> tuple[Split | None, torch.nn.Module, Transfer]:
    """The split (None when streaming: it is read after the process group exists) and
    the model, with the same initial weights on every rank (``model.init_from``'s, unless
    the run resumes from its own checkpoint) and its frozen parameters frozen."""
    recipe, training = plan.recipe, plan.training
    seed_everything(recipe.train.seed)
    split = None if recipe.data.streaming else load_split(recipe.data, training.data, seed=recipe.train.seed)
    model = build_model(recipe.model, training.data)
    transfer = Transfer.of(model, recipe)
    init = training.model.init if training.model is not None else None
    if init is not None and checkpoint.latest(plan.run_dir) is None:
        # Before the engine wraps the model: ZeRO-3 partitions the weights it finds.
        load_initial_weights(model, init, recipe.model.init_exclude)
    transfer.freeze(model)
    return split, model, transfer


def start_engine(plan: LaunchPlan, model: torch.nn.Module, transfer: Transfer,
                 split: Split | None) -> tuple[Engine, Split]:
    """The engine around ``model`` (this joins the process group), and the split."""
    # DeepSpeed's ZeRO calls torch collectives that torch has deprecated; nothing a user
    # can act on, printed by every rank (ZeRO-3's reduce_scatter_tensor at every step).
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)
    recipe = plan.recipe
    engine = create_engine(plan, model, transfer.param_groups(model, recipe.optim.weight_decay))
    transfer.hold(model, engine.schedule)
    if recipe.data.streaming:  # its normalisation statistics are a collective: after the process group
        split = streamed_split(recipe.data, plan.training.data, dist.get_rank(), dist.get_world_size(),
                               device=collective_device(plan))
    seed_everything(recipe.train.seed + dist.get_rank())  # per-rank dropout and augmentation
    return engine, split


def mix_micro_batch(batch: Batch, plan: LaunchPlan, *, rank: int, step: int, micro: int) -> Batch:
    """Mixup / cutmix / label smoothing of one micro-batch, as the recipe asks, drawn
    from (seed, rank, step, micro-batch): a resumed run mixes as the uninterrupted one
    did. The batch as it is when the recipe mixes nothing."""
    augment = plan.recipe.data.augment
    if not (augment.mixup_alpha or augment.cutmix_alpha or augment.label_smoothing):
        return batch
    seed = np.random.SeedSequence([plan.recipe.train.seed % 2**64, rank, step, micro]).generate_state(1)[0]
    return mix_batch(*batch, num_classes=plan.training.data.num_classes,
                     mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha,
                     label_smoothing=augment.label_smoothing, generator=torch.Generator().manual_seed(int(seed)))


def _throughput(plan: LaunchPlan, model: torch.nn.Module) -> Throughput:
    facts, tokens = plan.training.data, plan.recipe.data.kind == "tokens"
    example = torch.zeros(1, *facts.input_shape, dtype=torch.long if tokens else torch.float32)
    device = torch.cuda.get_device_name() if plan.topology.device == "cuda" else None
    peak = peak_flops(device, plan.recipe.precision.dtype, plan.recipe.logging.peak_tflops)
    return Throughput(training_flops_per_sample(model, example), facts.input_shape[0] if tokens else None,
                      None if peak is None else peak * plan.topology.world_size)


class SharedStep(NamedTuple):
    """A step's outcome as every rank sees it (Trainer._share_step)."""

    loss: float
    """The mean of the ranks' losses; the first non-finite one when a rank's is."""
    bad_ranks: list[int]
    """The ranks whose loss is NaN or Inf."""
    preempted: bool
    """A rank was asked to stop: all checkpoint this step and end."""


class Trainer:
    def __init__(self, plan: LaunchPlan, engine: Engine, split: Split, throughput: Throughput,
                 transfer: Transfer, progress: RankProgress) -> None:
        self.plan = plan
        self.engine = engine
        self.throughput = throughput
        self.transfer = transfer
        self.alerts = Alerts(plan.recipe.alerts, Path(plan.run_dir), write=dist.get_rank() == 0)
        self.run_dir = Path(plan.run_dir)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.steps, self.batch = plan.training.steps, plan.training.batch
        self.cfg = plan.recipe.train
        self.mode = monitor_mode(self.cfg)
        self.on_gpu = plan.topology.device == "cuda"
        self.batches = train_batches(split.train, plan.recipe.data, rank=self.rank, world_size=self.world,
                                     micro_batch=self.batch.micro, batches_per_step=self.batch.grad_accum,
                                     steps_per_epoch=self.steps.per_epoch, on_gpu=self.on_gpu, seed=self.cfg.seed)
        self.val = split.val
        self.step = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.overflows = 0  # fp16 steps the loss scaler skipped, over the whole run
        self.last_eval: dict[str, float] = {}
        self.shared_step: SharedStep | None = None
        self.metrics = MetricsLog(plan) if self.rank == 0 else None
        self.snapshots = SnapshotWriter(self.run_dir, self.steps.snapshots, self.rank)
        self.progress = progress
        self.faults = Faults.from_env(self.rank)
        self.profiler = StepProfiler(plan.recipe.logging.profile, self.run_dir / "profile", self.rank, self.on_gpu)
        self.tune_gate = tune_gate.enabled()  # a PBT trial's job: wait for Tune at each evaluation

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> None:
        """Train, then tell the sinks how the run ended: a stop policy, a crash or a
        preemption ends it as much as the last step does."""
        try:
            self._fit()
        except BaseException as exc:
            if self.metrics is not None:
                self.metrics.close("preempted" if isinstance(exc, preemption.Preempted) else "failed")
            raise

    def _fit(self) -> None:
        self.progress.mark(self.step + 1, "start")
        self._resume()
        self.snapshots.forget_after(self.step)  # those past the checkpoint come again
        total, per_epoch, accum = self.steps.total, self.steps.per_epoch, self.batch.grad_accum
        progress = Progress(total, self.step, self.rank == 0 and self.plan.recipe.logging.progress)
        started, windows = time.perf_counter(), RateWindows(self.batch.global_)
        first_step = self.step
        logging_cfg = self.plan.recipe.logging
        while self.step < total and not self.stopped_early:
            epoch, step_in_epoch = divmod(self.step, per_epoch)
            self.batches.set_epoch(epoch, start_batch=step_in_epoch * accum)
            batches = iter(self.batches)
            for _ in range(step_in_epoch, per_epoch):
                logged = (self.step + 1) % self.steps.log_every == 0 or self.step + 1 == total
                self.profiler.before_step(self.step + 1)
                self.progress.mark(self.step + 1, "data")
                self.faults.hang(self.step + 1, "data")
                micro_batches = [mix_micro_batch(next(batches), self.plan, rank=self.rank, step=self.step, micro=k)
                                 for k in range(accum)]
                self.progress.mark(self.step + 1, "compute")
                self.shared_step = None  # the engine's call of _share_step sets it
                with recording_activations(self.engine.module, logged and logging_cfg.activation_stats) as acts:
                    result = self.engine.train_step(micro_batches, skip_above=self.alerts.skip_above,
                                                    module_norms=logged and logging_cfg.module_grad_norms,
                                                    before_update=self._share_step)
                result = self._without_held_modules(result)
                self.step += 1
                self.overflows += result.overflow
                loss, bad_ranks, preempted = self.shared_step
                self.alerts.check(self.step, loss, bad_ranks, result)  # raises on a stop policy
                windows.step()
                samples_per_s = windows.close() if logged else windows.rate()
                lr = self.engine.schedule.lr
                progress.update({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "samples/s": f"{samples_per_s:.0f}"})
                if logged:
                    modules = {f"grad_norm/{name}": norm for name, norm in (result.module_grad_norms or {}).items()}
                    group_lrs = {f"lr/{kind}": rate for kind, rate in self.engine.schedule.group_lrs().items()}
                    self._record("train", {"epoch": epoch, "loss": loss, "lr": lr, **group_lrs,
                                           "grad_norm": result.grad_norm, **modules, **self._model_stats(result, acts),
                                           **self.throughput.rates(samples_per_s)})
                if (self.step % self.steps.eval_every == 0 or self.step == total
                        or self.snapshots.at_cycle_end(self.step)):  # every snapshot with its scores
                    self.progress.mark(self.step, "eval")
                    self._evaluate()
                if self.snapshots.due(self.step, self.stopped_early):  # before the checkpoint of its step
                    self.progress.mark(self.step, "snapshot")
                    self.snapshots.save(self.step, self.engine, self.last_eval)
                if (self.step % self.steps.checkpoint_every == 0 or self.step == total
                        or self.stopped_early or preempted):
                    self.progress.mark(self.step, "checkpoint")
                    self._checkpoint()
                    if (self.tune_gate and self.step % self.steps.eval_every == 0 and self.step < total
                            and not (self.stopped_early or preempted)):
                        self.progress.mark(self.step, "report")
                        tune_gate.wait(self.run_dir, self.step)
                if preempted and self.step < total and not self.stopped_early:
                    self._record("preempted", {"slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                                               "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")})
                    raise preemption.Preempted(f"checkpoint step-{self.step:08d}")
                self.faults.after_step(self.step)
                self.profiler.after_step(self.step)
                if self.step == total or self.stopped_early:
                    break
        progress.close()
        self.profiler.close()  # a run stopped early inside the profiled window
        self.progress.mark(self.step, "finish")
        self._finish(time.perf_counter() - started, self.step - first_step, windows.steady_rate())

    # -- pieces of a step -------------------------------------------------------------

    def _without_held_modules(self, result: StepResult) -> StepResult:
        """The step's module gradient norms less those of modules held frozen until a
        later step (model.unfreeze): their zero gradients are not vanishing ones."""
        if not result.module_grad_norms:
            return result
        held = self.transfer.held_modules(self.step)
        norms = {name: norm for name, norm in result.module_grad_norms.items() if name not in held}
        return replace(result, module_grad_norms=norms)

    def _share_step(self, loss: torch.Tensor) -> None:
        """One collective a step, into self.shared_step: every rank's loss and preemption
        flag. The logged loss is the mean (NaN with any rank's); the ranks whose loss is
        NaN or Inf go to the alerts; a preemption request on any rank is seen by all at
        this step. The engine calls it between the step's backward pass and its update,
        where the host waits for the device anyway (base.BeforeUpdate). On a GPU a read
        waits for the kernels queued before it: the flag is filled in on the device rather
        than copied there, and the gathered pairs come back in one read."""
        step = self.step + 1  # the step in progress: self.step counts finished ones
        self.faults.hang(step, "collective")
        self.progress.mark(step, "collective")
        flag = loss.new_full((), float(preemption.requested), dtype=torch.float32)
        mine = torch.stack([loss.float(), flag])
        shared = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(shared, mine)
        pairs = torch.stack(shared).tolist()
        self.progress.mark(step, "update")
        values = [value for value, _ in pairs]
        preempted = any(requested > 0 for _, requested in pairs)
        bad = [rank for rank, value in enumerate(values) if not math.isfinite(value)]
        self.shared_step = SharedStep(values[bad[0]] if bad else sum(values) / self.world, bad, preempted)

    def _model_stats(self, result: StepResult, activations: ActivationRecorder | None) -> dict[str, float]:
        """A logged step's weight norms, activation statistics (averaged over ranks) and
        fp16 loss scale, as they are enabled. The norms and averages are collectives:
        every rank computes them, rank 0 records them."""
        stats: dict[str, float] = {}
        if self.plan.recipe.logging.weight_norms:
            total, modules = self.engine.weight_norms()
            stats["weight_norm"] = total
            stats |= {f"weight_norm/{name}": norm for name, norm in modules.items()}
        if activations is not None:
            for name, (mean, std, zero) in activations.averaged(collective_device(self.plan),
                                                                reduce=dist.all_reduce).items():
                stats |= {f"act_mean/{name}": mean, f"act_std/{name}": std, f"act_zero/{name}": zero}
        if result.loss_scale is not None:
            stats |= {"loss_scale": result.loss_scale, "overflows": self.overflows}
        return stats

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Loss and accuracy on the validation split, sharded over ranks. Every rank
        runs the same number of batches (padded rows weigh zero): under ZeRO-3 and FSDP
        a forward pass is a collective."""
        if len(self.val) == 0:
            return
        sums = torch.zeros(3, dtype=torch.float64)
        for inputs, targets, w in eval_batches(self.val, self.plan.recipe.data, rank=self.rank,
                                               world_size=self.world, batch=self.batch.micro,
                                               on_gpu=self.on_gpu):
            per_sample_loss, per_sample_acc = sample_scores(self.engine.predict(inputs).cpu(), targets.cpu())
            w = w.cpu()
            sums += torch.stack([(per_sample_loss * w).sum(), (per_sample_acc * w).sum(), w.sum()]).double()
        device_sums = sums.to(collective_device(self.plan))
        dist.all_reduce(device_sums)
        loss_sum, acc_sum, count = device_sums.cpu().tolist()
        self.last_eval = {"val_loss": loss_sum / count, "val_acc": acc_sum / count}
        self._record("eval", self.last_eval)
        self._track(self.last_eval[self.cfg.monitor])

    def _track(self, value: float) -> None:
        """Best value, reduce-on-plateau and early stopping on the monitored metric."""
        self.engine.schedule.on_eval(value)
        delta = self.cfg.early_stopping.min_delta
        improved = self.best is None or (
            value < self.best - delta if self.mode == "min" else value > self.best + delta)
        if improved:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            return
        self.bad_evals += 1
        patience = self.cfg.early_stopping.patience
        if patience is not None and self.bad_evals >= patience:
            self.stopped_early = True
            self._record("early_stop", {"monitor": self.cfg.monitor, "best": self.best,
                                        "best_step": self.best_step})

    def _checkpoint(self) -> None:
        state = {"step": self.step, "best": self.best, "best_step": self.best_step,
                 "bad_evals": self.bad_evals, "stopped_early": self.stopped_early, "overflows": self.overflows,
                 "schedule": self.engine.schedule.state_dict(), "alerts": self.alerts.state_dict()}
        path = checkpoint.save(self.run_dir, self.step, self.engine, state, self.cfg.keep_last, self.faults)
        log.info("checkpoint %s", path.name)

    def _resume(self) -> None:
        choice = self._checkpoint_choice()
        resuming_from = choice.checkpoint.name if choice.checkpoint else None
        for rejected in choice.rejected:
            self._record("checkpoint_rejected", {"checkpoint": rejected.checkpoint.name,
                                                 "problems": list(rejected.problems), "resuming_from": resuming_from})
        if self.rank == 0:
            for line in choice.warnings():
                log.warning(line)
                print(f"dlaunch: {line}", file=sys.stderr)
        if choice.checkpoint is None:
            if choice.rejected:  # starting over from step 0 would hide the loss of the run so far
                raise checkpoint.NoGoodCheckpoint(choice.error())
            return
        state = checkpoint.load(choice.checkpoint, self.engine)
        self.engine.schedule.load_state_dict(state["schedule"])
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        self.bad_evals, self.stopped_early = state["bad_evals"], state["stopped_early"]
        # Absent from the checkpoints of older versions:
        self.overflows = state.get("overflows", 0)
        if "alerts" in state:
            self.alerts.load_state_dict(state["alerts"])
        self._record("resume", {"checkpoint": resuming_from})
        log.info("resumed from %s at step %d", resuming_from, self.step)

    def _checkpoint_choice(self) -> checkpoint.Choice:
        """Rank 0 verifies the checkpoints (one reader of the shared files, not one a
        rank) and tells every rank its choice, so that all load the same one."""
        choice = [checkpoint.choose(self.run_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0, device=collective_device(self.plan))
        return choice[0]

    def _record(self, kind: str, values: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(kind, self.step, values)

    def _finish(self, seconds: float, steps_run: int, samples_per_s: float | None) -> None:
        weights = self.engine.full_state_dict()  # a collective under ZeRO-3
        if self.rank != 0:
            return
        torch.save(weights, self.run_dir / "model.pt")
        # The training rate, not steps over wall time: on that the MFU of a short run
        # would count its warm-up, evaluations and checkpoints as idle devices.
        if samples_per_s is None:  # no logged step
            samples_per_s = steps_run * self.batch.global_ / seconds if seconds > 0 else 0.0
        rates = self.throughput.rates(samples_per_s)
        summary = {"steps": self.step, "seconds": round(seconds, 2), **rates, **self.last_eval, "best": self.best, "best_step": self.best_step,
                   "stopped_early": self.stopped_early}
        self._record("summary", summary)
        self.metrics.close()
        if self.plan.recipe.logging.report:
            from launcher.report import write_report

            write_report([self.run_dir], self.run_dir / "report")
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items())
        best = f" (best {self.cfg.monitor} {self.best:.4f} at step {self.best_step})" if self.best is not None else ""
        why = "stopped early" if self.stopped_early else "done"
        speed = f"{samples_per_s:.0f} samples/s" + (f", {rates['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in rates
                                                    else "") + (f", MFU {rates['mfu']:.1%}" if "mfu" in rates else "")
        print(f"dlaunch: {why}: {self.step} steps in {seconds:.1f}s, training at {speed}"
              f"{'; ' + scores if scores else ''}{best}; run dir {self.run_dir}", file=sys.stderr)
