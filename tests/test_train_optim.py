"""Optimizer choice, the warmup + cosine schedule, and the weight EMA."""

import math

import pytest
import torch

from vistra import create_model
from vistra.train import TrainConfig
from vistra.train.ema import ModelEma
from vistra.train.optim import WarmupCosine, build_optimizer, build_scheduler


def _model():
    return create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1,
                        num_classes=3)


def test_schedule_warms_up_linearly_then_follows_a_cosine_down_to_lrf():
    f = WarmupCosine(total_steps=20, warmup_steps=4, lrf=0.01)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    middle = 4 + (19 - 4) / 2
    assert f(middle) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(19) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(4, 19))


def test_scheduler_steps_per_batch_over_all_epochs():
    cfg = TrainConfig(lr=0.1, lrf=0.1, epochs=3, warmup_epochs=1)
    model = _model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[-1] == pytest.approx(0.01)
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]


def test_optimizers_follow_the_config():
    sgd = build_optimizer(_model(), TrainConfig(optimizer="sgd", lr=0.01, momentum=0.8,
                                                weight_decay=5e-5))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-5, 0.0]
    assert isinstance(build_optimizer(_model(), TrainConfig()), torch.optim.AdamW)


def test_ema_moves_towards_the_weights_with_a_warming_decay():
    model = _model()
    ema = ModelEma(model, decay=0.99)
    start = ema.module.head.bias.clone()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    ema.update(model)
    decay = min(0.99, 2 / 11)  # first update: (1 + n) / (10 + n) with n = 1
    assert torch.allclose(ema.module.head.bias, start + (1 - decay))
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEma(_model(), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    assert torch.equal(restored.module.head.bias, ema.module.head.bias)
    assert math.isclose(ema.decay, 0.99)
