"""The planner: batch arithmetic, LR scaling, engine configs, refused combinations."""

from __future__ import annotations

import math

import pytest

from launcher.data.facts import DataFacts
from launcher.errors import UsageError
from launcher.plan import HostFacts, LaunchPlan, build_plan
from launcher.recipe import Recipe

CPU = HostFacts(has_cuda=False, cpus=8, hostname="laptop")
GPU = HostFacts(has_cuda=True, cpus=64, hostname="gpu-node")
DIGITS = DataFacts(num_rows=1797, num_train=1438, num_val=359, input_shape=(1, 8, 8), num_classes=10)
BIG = DataFacts(num_rows=100_000, num_train=90_000, num_val=10_000, input_shape=(32,), num_classes=4)


def recipe(**sections) -> Recipe:
    return Recipe.model_validate(sections)


def plan(r: Recipe, *, host=CPU, data=DIGITS, nodes=None, procs=None) -> LaunchPlan:
    return build_plan(r, host=host, data=data, run_dir="runs/x", nodes=nodes, procs_per_node=procs)


def refusal(r: Recipe, **kw) -> UsageError:
    with pytest.raises(UsageError) as info:
        plan(r, **kw)
    return info.value


def test_global_batch_is_micro_times_world_times_accumulation():
    p = plan(recipe(train={"micro_batch_size": 16, "grad_accum": 2}), nodes=2, procs=2)
    assert p.topology.world_size == 4
    assert (p.training.batch.micro, p.training.batch.grad_accum, p.training.batch.global_) == (16, 2, 128)


def test_accumulation_is_derived_from_the_global_batch():
    p = plan(recipe(train={"micro_batch_size": 8, "global_batch_size": 64}), data=BIG, nodes=4, procs=1)
    assert p.training.batch.grad_accum == 2


def test_global_batch_not_divisible_by_world_is_refused():
    err = refusal(recipe(train={"micro_batch_size": 8, "global_batch_size": 100}), nodes=3, procs=1)
    assert err.key == "train.global_batch_size"
    assert "8 x 3 = 24" in err.message


def test_linear_lr_scaling_for_sgd():
    p = plan(recipe(optim={"name": "sgd", "lr": 0.1, "reference_batch": 256},
                    train={"micro_batch_size": 256}), data=BIG, nodes=2, procs=2)
    assert p.training.lr.rule == "linear"
    assert p.training.lr.scaled == pytest.approx(0.4)


def test_sqrt_lr_scaling_for_adam():
    p = plan(recipe(optim={"lr": 1e-3, "reference_batch": 32}, train={"micro_batch_size": 32}),
             data=BIG, nodes=4, procs=1)
    assert p.training.lr.rule == "sqrt"
    assert p.training.lr.scaled == pytest.approx(2e-3)


def test_no_reference_batch_means_no_scaling():
    p = plan(recipe(optim={"lr": 1e-3}), nodes=2)
    assert p.training.lr.scaled == 1e-3 and p.training.lr.rule == "none"


def test_steps_warmup_and_eval_cadence():
    p = plan(recipe(train={"micro_batch_size": 32, "epochs": 3},
                    schedule={"warmup_fraction": 0.1}), procs=2)
    steps = p.training.steps
    assert steps.per_epoch == 1438 // 64
    assert steps.total == 3 * steps.per_epoch
    assert steps.warmup == round(0.1 * steps.total)
    assert steps.eval_every == steps.per_epoch
    assert steps.checkpoint_every == steps.per_epoch


def test_max_steps_overrides_epochs():
    assert plan(recipe(train={"max_steps": 5, "epochs": 9})).training.steps.total == 5


def test_data_smaller_than_one_global_batch_is_refused():
    tiny = DataFacts(num_rows=10, num_train=8, num_val=2, input_shape=(4,), num_classes=2)
    assert refusal(recipe(), data=tiny).key == "train.micro_batch_size"


def test_fp16_with_deepspeed_on_cpu_is_refused_with_advice():
    err = refusal(recipe(precision={"dtype": "fp16"}))
    assert err.key == "precision.dtype"
    assert "bf16" in err.message


def test_fp16_with_deepspeed_on_gpus_enables_the_dynamic_loss_scaler():
    p = plan(recipe(precision={"dtype": "fp16"}), host=GPU, nodes=2, procs=8, data=BIG)
    config = p.training.engine.deepspeed
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0
    assert not config["bf16"]["enabled"]
    assert p.topology.dist_backend == "nccl"


def test_fp16_with_deepspeed_without_zero_is_refused():
    """DeepSpeed 0.19 never scales the loss of its non-ZeRO fp16 optimizer, which still
    unscales the gradients: on an H100 the weights did not move."""
    err = refusal(recipe(engine={"zero_stage": 0}, precision={"dtype": "fp16"}), host=GPU, data=BIG)
    assert err.key == "engine.zero_stage"
    assert "zero_stage 1-3" in err.message


def test_zero3_with_accelerate_ddp_is_refused():
    err = refusal(recipe(engine={"name": "accelerate", "zero_stage": 3}))
    assert err.key == "engine.zero_stage"
    assert "fsdp" in err.message


def test_fsdp_on_cpu_is_refused_rather_than_silently_ddp():
    assert refusal(recipe(engine={"name": "accelerate", "strategy": "fsdp"})).key == "engine.strategy"


def test_fsdp_on_gpus_maps_zero_stage_to_a_sharding_strategy():
    p = plan(recipe(engine={"name": "accelerate", "strategy": "fsdp", "zero_stage": 2},
                    precision={"dtype": "fp16"}), host=GPU, data=BIG, procs=8)
    assert p.training.engine.accelerate["fsdp"] == {"sharding_strategy": "SHARD_GRAD_OP", "use_orig_params": True}
    assert p.training.engine.accelerate["cpu"] is False


def test_parameter_offload_needs_zero3():
    assert refusal(recipe(engine={"zero_stage": 2, "offload_params": True})).key == "engine.offload_params"


def test_cnn_needs_image_shaped_data():
    flat = DataFacts(num_rows=100, num_train=80, num_val=20, input_shape=(64,), num_classes=10)
    assert refusal(recipe(model={"name": "cnn"}, train={"micro_batch_size": 8}), data=flat).key == "model.name"


def test_gpt_needs_token_data():
    assert refusal(recipe(model={"name": "gpt"})).key == "model.name"


def test_cuda_requested_on_a_host_without_gpus_is_refused():
    assert refusal(recipe(cluster={"device": "cuda"})).key == "cluster.device"


def test_deepspeed_config_carries_zero_offload_and_optimizer():
    p = plan(recipe(engine={"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
                    optim={"lr": 2e-4, "weight_decay": 0.1}))
    config = p.training.engine.deepspeed
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == pytest.approx(2e-4)
    assert "torch_adam" not in config["optimizer"]["params"]  # offload runs DeepSpeedCPUAdam
    assert config["gradient_clipping"] == 1.0


def test_user_deepspeed_entries_are_merged_over_the_generated_config():
    p = plan(recipe(engine={"deepspeed_config": {"zero_optimization": {"overlap_comm": True}}}))
    zero = p.training.engine.deepspeed["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": True}


@pytest.mark.parametrize("entries,key,typed", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "engine.zero_stage"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "precision.dtype"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ({"optimizer": {"params": {"weight_decay": 0.1}}}, "optimizer.params.weight_decay", "optim.weight_decay"),
])
def test_deepspeed_entries_the_plan_derives_from_typed_keys_are_refused(entries, key, typed):
    # The planner checks and estimates with the typed keys: DeepSpeed must run what it planned.
    err = refusal(recipe(engine={"deepspeed_config": entries}))
    assert (err.key, err.message) == (f"engine.deepspeed_config.{key}",
                                      f"dlaunch sets this from {typed}; set {typed} instead")


def test_offload_is_switched_on_by_its_typed_key_and_refined_in_deepspeed_config():
    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/local"}}}
    err = refusal(recipe(engine={"deepspeed_config": nvme}))
    assert err.key == "engine.deepspeed_config.zero_optimization.offload_optimizer"
    p = plan(recipe(engine={"zero_stage": 2, "offload_optimizer": True, "deepspeed_config": nvme}))
    assert p.training.engine.deepspeed["zero_optimization"]["offload_optimizer"] == {
        "device": "nvme", "nvme_path": "/local", "pin_memory": False}
    assert p.training.memory.bytes_on("host") > 0  # the estimate has the optimizer states off the device


@pytest.mark.parametrize("stage,dtype,host", [(stage, dtype, host) for stage in (0, 1, 2, 3)
                                              for dtype, host in (("bf16", CPU), ("fp32", CPU), ("fp16", GPU))
                                              if (stage, dtype) != (0, "fp16")])
def test_deepspeed_accepts_the_generated_config(stage, dtype, host, monkeypatch):
    from deepspeed.runtime import config as ds_config

    p = plan(recipe(engine={"zero_stage": stage}, precision={"dtype": dtype},
                    train={"micro_batch_size": 16, "grad_accum": 2}), host=host, data=BIG, nodes=2, procs=2)
    # DeepSpeed's parser checks the batch sizes against the world size it reads from
    # torch.distributed; give it the plan's world without starting four processes.
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 4)
    parsed = ds_config.DeepSpeedConfig(p.training.engine.deepspeed)
    assert parsed.train_batch_size == 128
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (dtype == "bf16")
    assert parsed.float16_config.enabled == (dtype == "fp16")


def test_a_wrong_world_size_makes_deepspeed_reject_the_config(monkeypatch):
    """The check above can fail: DeepSpeed does validate batch x world."""
    from deepspeed.runtime import config as ds_config

    p = plan(recipe(train={"micro_batch_size": 16}), data=BIG, nodes=2, procs=2)
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 3)
    with pytest.raises(AssertionError):
        ds_config.DeepSpeedConfig(p.training.engine.deepspeed)


def test_accelerate_kwargs():
    p = plan(recipe(engine={"name": "accelerate"}, train={"grad_accum": 4}), data=BIG)
    assert p.training.engine.accelerate == {"cpu": True, "mixed_precision": "bf16",
                                            "gradient_accumulation_steps": 4, "strategy": "ddp"}
    assert p.training.engine.zero_stage == 0


def test_fp16_with_accelerate_on_gpus_starts_torchs_grad_scaler_where_the_recipe_says():
    fp16 = {"dtype": "fp16", "initial_scale_power": 32, "loss_scale_window": 50}
    p = plan(recipe(engine={"name": "accelerate"}, precision=fp16), host=GPU, procs=1)
    assert p.training.engine.accelerate["grad_scaler"] == {"init_scale": 2.0 ** 32, "growth_interval": 50}
    err = refusal(recipe(engine={"name": "accelerate"}, precision={"dtype": "fp16", "loss_scale": 128.0}),
                  host=GPU, procs=1)
    assert err.key == "precision.loss_scale" and "initial_scale_power" in err.message


def test_plan_survives_json_round_trip():
    p = plan(recipe(train={"micro_batch_size": 16}), nodes=2, procs=1)
    again = LaunchPlan.from_json(p.to_json())
    assert again == p
    assert math.isclose(again.training.lr.scaled, p.training.lr.scaled)


def test_restarts_on_ray_are_refused_naming_the_key():
    r = recipe(train={"max_restarts": 2})
    with pytest.raises(UsageError) as info:
        build_plan(r, host=CPU, data=DIGITS, run_dir="runs/x", backend="ray")
    assert info.value.key == "train.max_restarts"
    assert build_plan(r, host=CPU, data=DIGITS, run_dir="runs/x", backend="local").recipe.train.max_restarts == 2


def test_the_printed_plan_shows_the_restarts():
    from launcher.plan import format_plan

    def row(r: Recipe) -> str:
        [line] = [line for line in format_plan(plan(r)).splitlines() if line.startswith("restarts ")]
        return line.removeprefix("restarts").strip()

    assert row(recipe(train={"max_restarts": 2})) == "up to 2 after a failure, each from the latest checkpoint"
    assert row(recipe()) == "none: the first failure ends the run"


def test_a_profile_window_past_the_last_step_is_refused():
    err = refusal(recipe(train={"max_steps": 12}, logging={"profile": {"start_step": 10, "steps": 5}}))
    assert err.key == "logging.profile.start_step"
    assert "10-14" in str(err) and "12 steps" in str(err)
    assert plan(recipe(train={"max_steps": 14}, logging={"profile": {"start_step": 10, "steps": 5}}))


def test_cpu_ranks_share_the_cores_of_their_node_and_local_nodes_share_this_hosts():
    def threads(r: Recipe, backend: str, nodes: int, procs: int) -> str | None:
        built = build_plan(r, host=CPU, data=DIGITS, run_dir="runs/x", backend=backend, nodes=nodes,
                           procs_per_node=procs)
        return built.env.get("OMP_NUM_THREADS")

    # The local backend's nodes are all this 8-core host: 2 nodes of 2 ranks get 2 threads
    # a rank, not 4 (16 threads on 8 cores; on 2 cores that made a 2-node quickstart 8x slower).
    assert [threads(recipe(), "local", n, p) for n, p in ((1, 2), (2, 2), (4, 4))] == ["4", "2", "1"]
    # A Slurm node's cores are the ones the job asks each node's task for.
    on_slurm = recipe(cluster={"slurm": {"cpus_per_task": 8}})
    assert [threads(on_slurm, "slurm", n, p) for n, p in ((1, 2), (4, 2), (2, 12))] == ["4", "4", "1"]
    assert threads(recipe(), "slurm", 4, 2) is None  # the node's own (torchrun's, for several ranks)


def test_thread_and_allocator_settings_of_the_users_environment_win_and_are_recorded():
    # As torchrun leaves an OMP_NUM_THREADS it finds alone; recorded in the plan, so that
    # Slurm and Ray ranks get it and a resume from another shell runs the same.
    user_env = {"OMP_NUM_THREADS": "3", "MALLOC_TRIM_THRESHOLD_": "0", "HOME": "/home/me"}
    for backend in ("local", "slurm", "ray"):
        env = build_plan(recipe(), host=CPU, data=DIGITS, run_dir="runs/x", backend=backend, nodes=2,
                         procs_per_node=2, user_env=user_env).env
        assert (env["OMP_NUM_THREADS"], env["MALLOC_TRIM_THRESHOLD_"]) == ("3", "0"), backend
        assert env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 30) and "HOME" not in env
    assert plan(recipe()).env["OMP_NUM_THREADS"] == "8"  # without: this 8-core host's cores


def test_cpu_ranks_tell_deepspeed_how_many_ranks_share_their_node():
    # LOCAL_SIZE, as DeepSpeed's own launcher sets it for CPU ranks (its CPU accelerator's
    # device count); tests/integration/test_deepspeed_cpu_env.py shows what it saves.
    for backend, nodes, procs in (("local", 1, 2), ("local", 2, 1), ("slurm", 4, 3), ("ray", 2, 2)):
        built = build_plan(recipe(), host=CPU, data=DIGITS, run_dir="runs/x", backend=backend, nodes=nodes,
                           procs_per_node=procs)
        assert built.env["LOCAL_SIZE"] == str(procs), backend
    assert "LOCAL_SIZE" not in plan(recipe(cluster={"device": "cuda"}), host=GPU, data=BIG).env


def test_cpu_ranks_keep_freed_memory_in_the_heap_and_gpu_ranks_are_left_alone():
    cpu = plan(recipe()).env
    assert cpu["MALLOC_MMAP_THRESHOLD_"] == cpu["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    gpu = plan(recipe(cluster={"device": "cuda"}), host=GPU, data=BIG).env
    assert not any(name.startswith("MALLOC_") for name in gpu)
