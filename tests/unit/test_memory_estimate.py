"""The per-rank model-state estimate (launcher/memory.py): the ZeRO paper's (2 + 2 + K)·Ψ
partitioned by stage, by engine, precision, optimizer, CPU offload and frozen parameters;
and the plan that carries it."""

from __future__ import annotations

import pytest

from launcher.data.facts import describe
from launcher.memory import format_memory, model_states, optimizer_state_bytes
from launcher.models.facts import ModelFacts
from launcher.plan import HostFacts, LaunchPlan, build_plan, format_plan
from launcher.recipe import Recipe

PSI = 1_000_000  # divisible by every world size here: each partition is exact
HOST = HostFacts(has_cuda=False, cpus=4, hostname="test")


def device_and_host(**kwargs) -> tuple[int, int]:
    estimate = model_states(params=PSI, trainable=PSI, **kwargs)
    return estimate.bytes_on("device"), estimate.bytes_on("host")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mixed_precision_adam_follows_the_zero_paper(world):
    """Rajbhandari et al., figure 1: 2 + 2 + K with K = 12, partitioned stage by stage."""
    paper = {0: (2 + 2 + 12) * PSI, 1: (2 + 2) * PSI + 12 * PSI // world,
             2: 2 * PSI + (2 + 12) * PSI // world, 3: (2 + 2 + 12) * PSI // world}
    for stage, expected in paper.items():
        got = device_and_host(world_size=world, engine="deepspeed", zero_stage=stage, precision="bf16",
                              optimizer_bytes=optimizer_state_bytes("adamw", 0.9))
        assert got == (expected, 0), stage


def test_fp32_deepspeed_keeps_a_master_copy_once_zero_partitions():
    # Stage 0 steps torch's AdamW on the module's fp32 weights: 4 + 4 + 8. ZeRO's
    # optimizers copy their fp32 partition even in fp32: K = 4 + 8 (measured by bench/memory.py).
    fp32 = {stage: device_and_host(world_size=4, engine="deepspeed", zero_stage=stage, precision="fp32",
                                   optimizer_bytes=8)[0] for stage in range(4)}
    assert fp32 == {0: 16 * PSI, 1: 8 * PSI + 12 * PSI // 4, 2: 4 * PSI + 16 * PSI // 4, 3: 20 * PSI // 4}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_accelerate_keeps_fp32_states_and_fsdp_shards_them(precision):
    """Autocast: fp32 weights, gradients and Adam states in every precision; DDP on every
    rank, FSDP's FULL_SHARD over all ranks, SHARD_GRAD_OP all but the weights."""
    def device(stage: int) -> int:
        return device_and_host(world_size=4, engine="accelerate", zero_stage=stage, precision=precision,
                               optimizer_bytes=8)[0]

    assert (device(0), device(2), device(3)) == (16 * PSI, 4 * PSI + 12 * PSI // 4, 16 * PSI // 4)


@pytest.mark.parametrize(("name", "momentum", "state"), [("adam", 0.9, 8), ("adamw", 0.0, 8),
                                                          ("sgd", 0.9, 4), ("sgd", 0.0, 0)])
def test_optimizer_states_by_optimizer(name, momentum, state):
    assert optimizer_state_bytes(name, momentum) == state
    # Mixed precision adds the fp32 master copy to K; a plain SGD in fp32 has no state at all.
    mixed = model_states(params=PSI, trainable=PSI, world_size=1, engine="deepspeed", zero_stage=0,
                         precision="bf16", optimizer_bytes=state)
    fp32 = model_states(params=PSI, trainable=PSI, world_size=1, engine="deepspeed", zero_stage=0,
                        precision="fp32", optimizer_bytes=state)
    assert [s.bytes_per_param for s in mixed.states if s.state == "optimizer"] == [4 + state]
    assert [s.bytes_per_param for s in fp32.states if s.state == "optimizer"] == ([state] if state else [])


def test_offload_moves_states_to_host_memory():
    bf16 = {"world_size": 4, "engine": "deepspeed", "precision": "bf16", "optimizer_bytes": 8}
    # The optimizer states and the fp32 gradient partition they step with go to the host;
    # ZeRO-1 still accumulates whole 16-bit gradients on the device.
    assert device_and_host(zero_stage=1, offload_optimizer=True, **bf16) == (4 * PSI, (4 + 12) * PSI // 4)
    assert device_and_host(zero_stage=2, offload_optimizer=True, **bf16) == (2 * PSI, (4 + 12) * PSI // 4)
    assert device_and_host(zero_stage=3, offload_optimizer=True, **bf16) == (2 * PSI // 4, 16 * PSI // 4)
    assert device_and_host(zero_stage=3, offload_optimizer=True, offload_params=True, **bf16) == \
        (0, (2 + 4 + 12) * PSI // 4)
    assert device_and_host(zero_stage=3, offload_params=True, **bf16) == ((2 + 12) * PSI // 4, 2 * PSI // 4)


def test_frozen_parameters_have_weights_only():
    estimate = model_states(params=PSI, trainable=PSI // 4, world_size=2, engine="deepspeed", zero_stage=2,
                            precision="bf16", optimizer_bytes=8)
    assert {s.state: s.bytes for s in estimate.states} == {
        "parameters": 2 * PSI, "gradients": 2 * PSI // 4 // 2, "optimizer": 12 * PSI // 4 // 2}
    [line] = format_memory(estimate, device="cpu", sharding="ZeRO-2 over 2 ranks")
    assert "= 2 bytes x Ψ + (2/2 + 12/2) bytes x 250K trainable (Ψ = 1M parameters" in line


def test_partitions_round_up():
    """ZeRO pads the flat buffer to a multiple of the world size."""
    estimate = model_states(params=10, trainable=10, world_size=4, engine="deepspeed", zero_stage=3,
                            precision="bf16", optimizer_bytes=8)
    assert [s.bytes for s in estimate.states] == [5, 5, 30]


def test_the_printed_line_names_each_state_and_the_formula():
    estimate = model_states(params=PSI, trainable=PSI, world_size=4, engine="deepspeed", zero_stage=2,
                            precision="bf16", optimizer_bytes=8, offload_optimizer=False)
    [line] = format_memory(estimate, device="cuda", sharding="ZeRO-2 over 4 ranks")
    total = (2 * PSI + 2 * PSI // 4 + 12 * PSI // 4) / 2**20
    assert line == (f"model states ≈ {total:.1f} MiB per rank on cuda: parameters {2 * PSI / 2**20:.1f}, "
                    f"gradients {PSI / 2 / 2**20:.1f}, optimizer {3 * PSI / 2**20:.1f} MiB = "
                    "(2 + 2/4 + 12/4) bytes x Ψ (Ψ = 1M parameters, ZeRO-2 over 4 ranks)")
    offloaded = model_states(params=PSI, trainable=PSI, world_size=4, engine="deepspeed", zero_stage=3,
                             precision="bf16", optimizer_bytes=8, offload_optimizer=True, offload_params=True)
    first, second = format_memory(offloaded, device="cuda", sharding="ZeRO-3 over 4 ranks")
    assert "≈ 0 B per rank on cuda: all of them offloaded" in first
    assert second.startswith(f"+ {18 * PSI / 4 / 2**20:.1f} MiB per rank in host memory (CPU offload): ")
    assert second.endswith("= (2/4 + 4/4 + 12/4) bytes x Ψ")


def recipe(**sections) -> Recipe:
    return Recipe.model_validate({"name": "t", "data": {"source": "digits"}, "train": {"max_steps": 4},
                                  **sections})


def test_the_plan_carries_the_estimate_through_plan_json():
    r = recipe(model={"name": "mlp", "kwargs": {"hidden": [64]}}, engine={"zero_stage": 1})
    plan = build_plan(r, host=HOST, data=describe(r.data), run_dir="/tmp/r", nodes=2, procs_per_node=2)
    psi = 64 * 64 + 64 + 64 * 10 + 10  # digits: 64 features, 10 classes
    memory = plan.training.memory
    assert (memory.params, memory.trainable) == (psi, psi)
    assert memory.bytes_on("device") == 2 * psi + 2 * psi + 12 * psi // 4 + (12 * psi % 4 > 0)
    assert LaunchPlan.from_json(plan.to_json()) == plan
    assert "(2 + 2 + 12/4) bytes x Ψ (Ψ = 4.81K parameters, ZeRO-1 over 4 ranks)" in format_plan(plan)


def test_the_plan_counts_what_transfer_learning_freezes():
    """Parameters unfrozen later train from the start as far as the engine knows: they
    have gradients and optimizer states; the others frozen do not."""
    r = recipe(model={"name": "mlp", "freeze": ["net.1.*"]})
    facts = ModelFacts(init=None, params=1000, frozen=300, unfrozen_later=100)
    plan = build_plan(r, host=HOST, data=describe(r.data), run_dir="/tmp/r", model=facts)
    assert (plan.training.memory.params, plan.training.memory.trainable) == (1000, 800)


def test_a_plan_without_a_count_says_so():
    """A target model the caller did not count, or built-in kwargs the model refuses."""
    r = recipe(model={"name": "mlp", "kwargs": {"hidden": "wide"}})
    plan = build_plan(r, host=HOST, data=describe(r.data), run_dir="/tmp/r")
    assert plan.training.memory is None
    [line] = [line for line in format_plan(plan).splitlines() if line.startswith("memory ")]
    assert line.split(None, 1)[1] == "not estimated: the model's parameters could not be counted"
