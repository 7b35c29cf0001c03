"""A SweepSpec as Ray Tune objects: sampled values stay in their bounds, grids expand,
the searcher and schedulers carry the spec's settings. No Ray cluster is started:
generating trials and suggesting configs happen on the driver."""

from __future__ import annotations

import optuna
import pytest
from ray import tune
from ray.tune.experiment import Experiment
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.schedulers.pbt import _explore
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from cluster.tune_space import param_space, search_algorithm, trial_scheduler
from launcher.errors import UsageError
from launcher.recipe import SweepSchedulerConfig
from launcher.sweep import Dimension, SweepSpec, overrides_for

LR = Dimension("optim.lr", "loguniform", low=1e-4, high=1e-1)
WARMUP = Dimension("schedule.warmup_fraction", "uniform", low=0.0, high=0.2)
HIDDEN = Dimension("model.kwargs.hidden", "randint", low=32, high=128)
BATCH = Dimension("train.micro_batch_size", "choice", values=(16, 32))
DECAY = Dimension("optim.weight_decay", "grid", values=(0.0, 0.01))


def make_spec(*dimensions: Dimension, search="random", scheduler="fifo", metric="val_loss", mode="min",
              num_samples=4, max_concurrent=None, seed=0, **scheduler_settings) -> SweepSpec:
    return SweepSpec(dimensions=dimensions, metric=metric, mode=mode, num_samples=num_samples,
                     max_concurrent=max_concurrent, search=search, seed=seed,
                     scheduler=SweepSchedulerConfig(name=scheduler, **scheduler_settings))


def trial_configs(spec: SweepSpec, tmp_path, limit: int = 1000) -> list[dict]:
    """The configs the spec's search algorithm hands out, as Tune's controller asks
    for them (without finishing any trial)."""
    generator = search_algorithm(spec)
    generator.add_configurations([Experiment("sweep", lambda config: None, config=param_space(spec),
                                             num_samples=spec.num_samples, storage_path=str(tmp_path))])
    configs = []
    while len(configs) < limit and (trial := generator.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_the_param_space_is_nested_by_key_path():
    space = param_space(make_spec(LR, HIDDEN, BATCH, DECAY))
    assert set(space) == {"optim", "model", "train"}
    assert set(space["optim"]) == {"lr", "weight_decay"}
    assert space["optim"]["weight_decay"] == {"grid_search": [0.0, 0.01]}
    assert isinstance(space["model"]["kwargs"]["hidden"], tune.search.sample.Integer)
    assert space["train"]["micro_batch_size"].categories == [16, 32]


def test_sampled_values_stay_in_their_bounds_with_their_types():
    space = param_space(make_spec(LR, WARMUP, HIDDEN, BATCH))
    for _ in range(300):
        lr = space["optim"]["lr"].sample()
        warmup = space["schedule"]["warmup_fraction"].sample()
        hidden = space["model"]["kwargs"]["hidden"].sample()
        batch = space["train"]["micro_batch_size"].sample()
        assert type(lr) is float and 1e-4 <= lr <= 1e-1
        assert type(warmup) is float and 0.0 <= warmup <= 0.2
        assert type(hidden) is int and 32 <= hidden < 128
        assert batch in (16, 32) and type(batch) is int


def test_loguniform_spreads_over_the_decades():
    lr = param_space(make_spec(LR))["optim"]["lr"]
    samples = [lr.sample() for _ in range(600)]
    assert sum(s < 1e-3 for s in samples) > 100  # uniform sampling would put ~1% there


def test_grid_search_over_two_choices_of_two_gives_four_configs(tmp_path):
    lrs = Dimension("optim.lr", "choice", values=(0.001, 0.01))
    configs = trial_configs(make_spec(lrs, BATCH, search="grid", num_samples=1), tmp_path)
    points = sorted((c["optim"]["lr"], c["train"]["micro_batch_size"]) for c in configs)
    assert points == [(0.001, 16), (0.001, 32), (0.01, 16), (0.01, 32)]


def test_a_grid_is_repeated_num_samples_times_with_the_rest_sampled(tmp_path):
    configs = trial_configs(make_spec(LR, DECAY, num_samples=3), tmp_path)
    assert sorted(c["optim"]["weight_decay"] for c in configs) == [0.0] * 3 + [0.01] * 3
    assert len({c["optim"]["lr"] for c in configs}) == 6


def test_the_same_seed_samples_the_same_trials(tmp_path):
    first = trial_configs(make_spec(LR, HIDDEN, seed=7), tmp_path)
    again = trial_configs(make_spec(LR, HIDDEN, seed=7), tmp_path)
    other = trial_configs(make_spec(LR, HIDDEN, seed=8), tmp_path)
    assert first == again and first != other


def test_a_trials_config_becomes_set_overrides(tmp_path):
    (config,) = trial_configs(make_spec(LR, HIDDEN, num_samples=1), tmp_path)
    overrides = overrides_for(config)
    assert [o.split("=")[0] for o in overrides] == ["model.kwargs.hidden", "optim.lr"]
    assert overrides[1] == f"optim.lr={config['optim']['lr']!r}"


def test_random_search_holds_the_concurrency_limit_itself(tmp_path):
    """Tune ignores TuneConfig.max_concurrent_trials for a ready-made generator."""
    spec = make_spec(LR, num_samples=5, max_concurrent=2)
    generator = search_algorithm(spec)
    assert isinstance(generator, BasicVariantGenerator) and generator.max_concurrent == 2
    assert len(trial_configs(spec, tmp_path)) == 2  # no trial ends, so the third waits
    assert search_algorithm(make_spec(LR)).max_concurrent == 0  # 0: no limit


def test_optuna_suggests_nested_configs_in_bounds_from_the_param_space():
    spec = make_spec(LR, HIDDEN, BATCH, search="optuna", metric="val_acc", mode="max", max_concurrent=2)
    searcher = search_algorithm(spec)
    assert isinstance(searcher, OptunaSearch)
    assert (searcher.metric, searcher.mode) == ("val_acc", "max")
    assert isinstance(searcher._sampler, optuna.samplers.TPESampler)
    # What Tune does with the Tuner's param_space when TuneConfig sets no metric/mode.
    assert searcher.set_search_properties(None, None, param_space(spec))
    configs = [searcher.suggest(f"trial-{i}") for i in range(20)]
    for config in configs:
        assert 1e-4 <= config["optim"]["lr"] <= 1e-1
        assert 32 <= config["model"]["kwargs"]["hidden"] < 128 and type(config["model"]["kwargs"]["hidden"]) is int
        assert config["train"]["micro_batch_size"] in (16, 32)
        assert overrides_for(config)[0].startswith("model.kwargs.hidden=")
    again = search_algorithm(spec)
    again.set_search_properties(None, None, param_space(spec))
    assert [again.suggest(f"trial-{i}") for i in range(20)] == configs


def test_fifo_runs_every_trial_and_leaves_metric_to_tune_config():
    scheduler = trial_scheduler(make_spec(LR), max_t=5)
    assert type(scheduler) is FIFOScheduler
    assert scheduler.set_search_properties("val_loss", "min")  # Tune accepts TuneConfig's metric


def test_asha_stops_at_rungs_from_grace_period_to_max_t():
    spec = make_spec(LR, scheduler="asha", metric="val_acc", mode="max", grace_period=2, reduction_factor=2.0)
    scheduler = trial_scheduler(spec, max_t=16)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler.metric, scheduler._mode, scheduler._max_t) == ("val_acc", "max", 16)
    assert scheduler._time_attr == "training_iteration"
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == [16, 8, 4, 2]
    # Holding metric and mode, it refuses TuneConfig's: the caller must not set them there.
    assert not scheduler.set_search_properties("val_acc", "max")
    assert scheduler.set_search_properties(None, None)


def test_asha_refuses_a_grace_period_longer_than_a_trial():
    with pytest.raises(UsageError) as info:
        trial_scheduler(make_spec(LR, scheduler="asha", grace_period=4), max_t=3)
    assert str(info.value) == ("error: sweep.scheduler.grace_period: grace_period 4 exceeds the 3 evaluations a "
                               "trial makes; lower it, or evaluate more often (train.eval_every)")


def test_pbt_mutates_every_dimension_in_the_nested_space():
    spec = make_spec(LR, HIDDEN, BATCH, DECAY, scheduler="pbt", perturbation_interval=2)
    scheduler = trial_scheduler(spec, max_t=10)
    assert isinstance(scheduler, PopulationBasedTraining)
    assert (scheduler.metric, scheduler._mode, scheduler._time_attr) == ("val_loss", "min", "training_iteration")
    assert scheduler._perturbation_interval == 2
    assert scheduler._synch is False
    assert trial_scheduler(make_spec(LR, scheduler="pbt", synch=True), max_t=10)._synch is True
    mutations = scheduler._hyperparam_mutations
    assert mutations["optim"]["weight_decay"] == [0.0, 0.01]
    assert mutations["train"]["micro_batch_size"] == [16, 32]
    assert isinstance(mutations["optim"]["lr"], tune.search.sample.Float)
    assert isinstance(mutations["model"]["kwargs"]["hidden"], tune.search.sample.Integer)


def test_pbt_keeps_perturbed_values_inside_their_bounds():
    spec = make_spec(LR, HIDDEN, WARMUP, scheduler="pbt", perturbation_interval=1)
    scheduler = trial_scheduler(spec, max_t=10)
    config = {"optim": {"lr": 0.09}, "model": {"kwargs": {"hidden": 120}}, "schedule": {"warmup_fraction": 0.19}}
    # Tune's own explore step, scaling every value up by 1.2 and never resampling.
    grown, _ = _explore(config, scheduler._hyperparam_mutations, resample_probability=0.0,
                        perturbation_factors=(1.2,), custom_explore_fn=scheduler._custom_explore_fn)
    assert grown == {"optim": {"lr": 0.1}, "model": {"kwargs": {"hidden": 127}},
                     "schedule": {"warmup_fraction": 0.2}}
    shrunk, _ = _explore({"optim": {"lr": 1.1e-4}, "model": {"kwargs": {"hidden": 33}},
                          "schedule": {"warmup_fraction": 0.1}},
                         scheduler._hyperparam_mutations, resample_probability=0.0,
                         perturbation_factors=(0.8,), custom_explore_fn=scheduler._custom_explore_fn)
    assert shrunk == {"optim": {"lr": 1e-4}, "model": {"kwargs": {"hidden": 32}},
                      "schedule": {"warmup_fraction": pytest.approx(0.08)}}


def test_pbt_refuses_an_interval_that_leaves_nothing_to_perturb():
    with pytest.raises(UsageError) as info:
        trial_scheduler(make_spec(LR, scheduler="pbt", perturbation_interval=3), max_t=3)
    assert str(info.value).startswith("error: sweep.scheduler.perturbation_interval: perturbation_interval 3 "
                                      "leaves no evaluation after a perturbation in the 3 a trial makes")
