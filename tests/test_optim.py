"""Optimizers and schedules by name, learning-rate scaling, weight averages (dfkd.optim)."""

import math

import pytest
import torch
import torch.nn as nn

from dfkd.config import OptimizerConfig
from dfkd.errors import DfkdError
from dfkd.optim import (
    OPTIMIZERS,
    SCHEDULES,
    WeightAverage,
    build_optimizer,
    build_schedule,
    ema_update,
    replan,
    scale_lr,
    schedule_state,
)


def test_the_registries_name_every_choice_the_config_offers():
    assert set(OPTIMIZERS.names()) == {"adam", "sgd"}
    assert set(SCHEDULES.names()) == {"cosine", "constant"}
    with pytest.raises(DfkdError, match="unknown optimizer 'adamw'"):
        build_optimizer([nn.Parameter(torch.zeros(1))], OptimizerConfig(name="adamw"))


def test_optimizers_take_their_settings_from_the_config():
    params = [nn.Parameter(torch.zeros(2))]
    adam = build_optimizer(params, OptimizerConfig(lr=0.01, betas=[0.5, 0.9], weight_decay=0.1))
    assert isinstance(adam, torch.optim.Adam)
    settings = {k: adam.defaults[k] for k in ("lr", "betas", "weight_decay")}
    assert settings == {"lr": 0.01, "betas": (0.5, 0.9), "weight_decay": 0.1}
    sgd = build_optimizer(params, OptimizerConfig(name="sgd", lr=0.1, momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5 and sgd.defaults["lr"] == 0.1


def rates(cfg, iterations, steps, factor=None, at=None):
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    sched = build_schedule(opt, cfg, iterations)
    out = []
    for step in range(steps):
        if step == at:
            scale_lr(opt, sched, factor)
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_anneals_to_zero_over_the_run_and_constant_stays():
    cosine = rates(OptimizerConfig(lr=1.0), 10, 11)
    assert cosine == pytest.approx([(1 + math.cos(math.pi * i / 10)) / 2 for i in range(11)], abs=1e-12)
    assert rates(OptimizerConfig(lr=0.3, schedule="constant"), 10, 5) == [0.3] * 5


def test_a_warmup_rises_linearly_under_the_schedule():
    warm = rates(OptimizerConfig(lr=1.0, warmup=4), 10, 11)
    cosine = rates(OptimizerConfig(lr=1.0), 10, 11)
    assert warm == pytest.approx([min(1, (i + 1) / 4) * c for i, c in enumerate(cosine)], abs=1e-12)
    assert warm[0] == pytest.approx(0.25 * 1.0) and warm[4:] == pytest.approx(cosine[4:], abs=1e-12)
    constant = rates(OptimizerConfig(lr=0.2, schedule="constant", warmup=2), 10, 3)
    assert constant == pytest.approx([0.1, 0.2, 0.2])


def test_replan_moves_a_warm_schedule_onto_the_longer_plan_and_the_state_keeps_it():
    cfg = OptimizerConfig(lr=1.0, warmup=2)
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    sched = build_schedule(opt, cfg, 4)
    for _ in range(3):
        opt.step()
        sched.step()
    replan(opt, sched, 8)
    assert opt.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 3 / 8)) / 2)
    # the checkpoint's state carries the plan, not the config a resume builds it from
    plain = OptimizerConfig(lr=1.0)
    fresh = build_schedule(build_optimizer([nn.Parameter(torch.zeros(1))], plain), plain, 4)
    fresh.load_state_dict(sched.state_dict())
    assert (fresh.lr_lambdas[0].steps, fresh.lr_lambdas[0].warmup) == (8, 2)


def test_a_cosine_saved_by_torchs_cosine_annealing_continues_on_the_same_curve():
    # checkpoints written before schedules were plans hold CosineAnnealingLR's state
    old_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(old_opt, T_max=10)
    for _ in range(3):
        old_opt.step()
        old.step()
    cfg = OptimizerConfig(name="sgd", lr=1.0, momentum=0.0)
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    sched = build_schedule(opt, cfg, 20)
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(schedule_state(old.state_dict()))
    assert sched.lr_lambdas[0].steps == 10
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 4 / 10)) / 2, abs=1e-12)


def test_scale_lr_scales_the_current_rate_and_the_rest_of_the_schedule():
    scaled = rates(OptimizerConfig(lr=1.0), 10, 11, factor=0.5, at=4)
    plain = rates(OptimizerConfig(lr=1.0), 10, 11)
    assert scaled[:4] == plain[:4]
    assert scaled[4:] == pytest.approx([0.5 * r for r in plain[4:]], abs=1e-12)


def test_ema_update_golden_values_and_copied_buffers():
    model, average = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 3.0]))
        average.weight.copy_(torch.tensor([5.0, -1.0]))
        model.running_mean.copy_(torch.tensor([7.0, 8.0]))
    ema_update(average, model, 0.75)
    assert torch.allclose(average.weight, torch.tensor([0.75 * 5 + 0.25 * 1, 0.75 * -1 + 0.25 * 3]))
    assert torch.equal(average.running_mean, model.running_mean)


def test_a_weight_average_is_a_frozen_copy_that_follows_its_source():
    source = nn.Linear(2, 1)
    average = WeightAverage(source, 0.5)
    assert average.model is not source and not any(p.requires_grad for p in average.model.parameters())
    start = [p.clone() for p in source.parameters()]
    with torch.no_grad():
        for p in source.parameters():
            p.add_(2.0)
    average.update()
    for avg, old in zip(average.model.parameters(), start):
        assert torch.allclose(avg, old + 1.0)
