"""How much memory a rank needs for the model states: parameters, gradients and optimizer
states, as the ZeRO paper counts them (Rajbhandari et al., 2020, section 3.1 and 5).

Mixed-precision Adam keeps (2 + 2 + K)·Ψ bytes for Ψ parameters: 16-bit weights, 16-bit
gradients, and K = 12 bytes of fp32 optimizer states (a master copy of the weights,
momentum, variance). ZeRO partitions them over the N data-parallel ranks: stage 1 the
optimizer states (2 + 2 + K/N), stage 2 the gradients too (2 + (2 + K)/N), stage 3 the
parameters too ((2 + 2 + K)/N). CPU offload moves the partitioned optimizer states (and
the gradient partition they step with) or the parameters to host memory. bench/memory.py
measures DeepSpeed against it.

What this leaves out, as the paper's formula does: activations (they grow with the
micro-batch and the sequence, not Ψ), the engines' communication buckets (DeepSpeed's
reduce and all-gather buckets, DDP's gradient buckets), ZeRO-3's prefetched and
persistent parameters (small ones are kept whole on every rank), the 16-bit staging copy
of the partition that offload keeps on the host, the allocator's fragmentation, and the
framework's own footprint (CUDA context, kernels). Pure: no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from launcher.recipe import Recipe

State = Literal["parameters", "gradients", "optimizer"]
Place = Literal["device", "host"]


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StateMemory(_Value):
    """One model state as one rank holds it: ``bytes_per_param`` for each of ``params``
    parameters, split over ``shards`` ranks (1: every rank holds all of it)."""

    state: State
    place: Place
    """The training device, or host memory (CPU offload)."""
    bytes_per_param: int
    params: int
    shards: int
    bytes: int
    """Per rank: bytes_per_param x params / shards, rounded up (ZeRO pads partitions)."""


class MemoryEstimate(_Value):
    """The model states one rank holds during training."""

    params: int
    """Ψ: the model's parameters (a shared one counted once)."""
    trainable: int
    """Those with a gradient and optimizer states: all but the frozen ones."""
    states: tuple[StateMemory, ...]

    def bytes_on(self, place: Place) -> int:
        return sum(s.bytes for s in self.states if s.place == place)


def optimizer_state_bytes(optimizer: str, momentum: float) -> int:
    """Bytes per parameter of the optimizer's own fp32 state: Adam's momentum and variance,
    SGD's momentum buffer (none without momentum)."""
    if optimizer in ("adam", "adamw"):
        return 8
    return 4 if momentum else 0


def model_states(*, params: int, trainable: int, world_size: int,
                 engine: Literal["deepspeed", "accelerate"], zero_stage: int,
                 precision: Literal["fp32", "bf16", "fp16"], optimizer_bytes: int,
                 offload_optimizer: bool = False, offload_params: bool = False) -> MemoryEstimate:
    """The model states one of ``world_size`` ranks holds.

    DeepSpeed trains the module itself in bf16/fp16 (2-byte weights and gradients) and
    keeps an fp32 master copy of the weights beside the optimizer's states (K = 4 +
    ``optimizer_bytes``). Its ZeRO optimizers (stages 1-3) keep that fp32 copy of their
    partition in fp32 training too (measured: bench/memory.py --precision fp32); only
    stage 0 in fp32 steps torch's optimizer on the module's own weights (K =
    ``optimizer_bytes``). Accelerate's mixed precision is autocast: weights, gradients and
    optimizer stay fp32 whatever the precision, and FSDP shards them like ZeRO
    (``zero_stage`` 2 for SHARD_GRAD_OP, 3 for FULL_SHARD; its gathered 16-bit copies are
    transient). Frozen parameters have weights only: no gradient, no optimizer state."""
    deepspeed = engine == "deepspeed"
    weight_bytes = 2 if deepspeed and precision != "fp32" else 4
    master = deepspeed and (precision != "fp32" or zero_stage >= 1)
    k = optimizer_bytes + (4 if master else 0)

    def share(state: State, place: Place, per_param: int, count: int, sharded: bool) -> StateMemory:
        shards = world_size if sharded else 1
        return StateMemory(state=state, place=place, bytes_per_param=per_param, params=count, shards=shards,
                           bytes=-(-per_param * count // shards))

    weights_at: Place = "host" if offload_params else "device"
    states = [share("parameters", weights_at, weight_bytes, params, zero_stage >= 3)]
    if offload_optimizer:
        # ZeRO-Offload: the CPU optimizer steps on an fp32 copy of the rank's gradient
        # partition in host memory; below stage 2 the device still accumulates them whole.
        if zero_stage < 2:
            states.append(share("gradients", "device", weight_bytes, trainable, False))
        states.append(share("gradients", "host", 4, trainable, True))
    else:
        states.append(share("gradients", "device", weight_bytes, trainable, zero_stage >= 2))
    if k:
        optimizer_at: Place = "host" if offload_optimizer else "device"
        states.append(share("optimizer", optimizer_at, k, trainable, zero_stage >= 1))
    return MemoryEstimate(params=params, trainable=trainable, states=tuple(states))


def estimate(recipe: Recipe, *, zero_stage: int, world_size: int, params: int,
             trainable: int) -> MemoryEstimate:
    """``model_states`` for the recipe's engine, precision, optimizer and offload."""
    engine, optim = recipe.engine, recipe.optim
    return model_states(params=params, trainable=trainable, world_size=world_size, engine=engine.name,
                        zero_stage=zero_stage, precision=recipe.precision.dtype,
                        optimizer_bytes=optimizer_state_bytes(optim.name, optim.momentum),
                        offload_optimizer=engine.offload_optimizer, offload_params=engine.offload_params)


def checkpoint_bytes(memory: MemoryEstimate, *, engine: str, zero_stage: int) -> int:
    """What one checkpoint's model states take on disk, all ranks' files together: each
    state whole, once, but the gradients, which are not saved. DeepSpeed's ZeRO-3 saves
    no 16-bit weights: the fp32 partitions of its optimizer are them. Measured against
    real checkpoints (tests/integration/test_checkpoint_room.py): within a few percent,
    plus tens of KiB of RNG states and DeepSpeed's zero_to_fp32.py."""
    weights_saved = not (engine == "deepspeed" and zero_stage == 3)
    return sum(s.bytes_per_param * s.params for s in memory.states
               if s.state == "optimizer" or (s.state == "parameters" and weights_saved))


def weights_bytes(memory: MemoryEstimate) -> int:
    """What the final weights (model.pt) and each snapshot take on disk: every parameter
    whole, in fp32 whatever the training precision (`Engine.full_state_dict`)."""
    return 4 * memory.params


# -- as `dlaunch plan` prints it --------------------------------------------------------

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _unit(size: int) -> tuple[str, int]:
    power = 0
    while power < len(_UNITS) - 1 and size >= 1024 ** (power + 1):
        power += 1
    return _UNITS[power], 1024**power


def amount(size: int) -> str:
    """`3.4 GiB`."""
    unit, scale = _unit(size)
    return f"{size} B" if scale == 1 else f"{size / scale:.1f} {unit}"


def _count(n: int) -> str:
    """1.05M, 340K, 7.2B: three significant digits."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _line(estimate: MemoryEstimate, place: Place) -> str:
    """'parameters 2.0, gradients 0.5, optimizer 3.0 MiB = (2 + 2/4 + 12/4) bytes x Ψ'."""
    states = [s for s in estimate.states if s.place == place]
    unit, scale = _unit(max(s.bytes for s in states))
    parts = ", ".join(f"{s.state} {s.bytes / scale:.1f}" for s in states)
    terms: dict[int, list[str]] = {}  # bytes per parameter over the parameters they count
    for s in states:
        split = f"/{s.shards}" if s.shards > 1 else ""
        terms.setdefault(s.params, []).append(f"{s.bytes_per_param}{split}")
    formula = " + ".join(
        (f"({' + '.join(ts)})" if len(ts) > 1 else ts[0])
        + f" bytes x {'Ψ' if n == estimate.params else f'{_count(n)} trainable'}" for n, ts in terms.items())
    return f"{parts} {unit} = {formula}"


def format_memory(estimate: MemoryEstimate, *, device: str, sharding: str) -> list[str]:
    """One line for the device, and one for host memory when states are offloaded."""
    on_device = estimate.bytes_on("device")
    held = _line(estimate, "device") if on_device else "all of them offloaded"
    lines = [f"model states ≈ {amount(on_device)} per rank on {device}: {held} "
             f"(Ψ = {_count(estimate.params)} parameters, {sharding})"]
    if offloaded := estimate.bytes_on("host"):
        lines.append(f"+ {amount(offloaded)} per rank in host memory (CPU offload): "
                     f"{_line(estimate, 'host')}")
    return lines
