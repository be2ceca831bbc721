"""Time budget: the number of epochs, and so where the cosine ends, fitted to measured speed."""

import types

import pytest
import torch
from test_train_e2e import make_colour_folder, tiny_config

import vistra.train.loop as loop
from vistra.train import train
from vistra.train.budget import epochs_within, replan, warmup_end
from vistra.train.checkpoint import load_training_state
from vistra.train.config import TrainConfig
from vistra.train.optim import build_optimizer, build_scheduler, set_schedule_length


def test_epochs_within_counts_what_fits_with_a_safety_margin():
    # 100 s epochs are planned as 105 s: 1000 s left hold 9 of them, not 10
    assert epochs_within(1100, 100, [100.0], 30) == 10
    assert epochs_within(1100, 100, [100.0], 5) == 5  # never more than asked for
    assert epochs_within(1100, 1200, [100.0] * 3, 30) == 3  # over budget: stop now
    # the median: one slow epoch does not cut the schedule, three do
    assert epochs_within(1100, 400, [200.0, 100.0, 100.0], 30) == 3 + 6
    assert epochs_within(1100, 700, [100.0, 200.0, 200.0, 200.0], 30) == 4 + 1
    assert warmup_end(0) == 1 and warmup_end(1) == 1 and warmup_end(1.5) == 2


def test_a_plan_grows_only_with_a_wider_margin_than_it_keeps_with():
    # 100 s epochs, 1000 s left: 10 epochs fit at 105 s each, 9 at 115 s
    assert replan(1100, 100, [100.0], planned=12, most=40) == 10  # shrinks to what fits
    assert replan(1100, 100, [100.0], planned=10, most=40) == 10
    assert replan(1100, 100, [100.0], planned=9, most=40) == 9  # on the edge: no flip-flop
    assert replan(1100, 100, [100.0], planned=8, most=40) == 9  # room to spare: grows
    assert replan(1100, 100, [100.0], planned=8, most=8) == 8


def test_a_shortened_schedule_continues_as_if_built_that_short():
    def schedule(epochs):
        cfg = TrainConfig(lr=0.1, lrf=0.01, epochs=epochs, warmup_epochs=1)
        optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
        return optimizer, build_scheduler(optimizer, cfg, steps_per_epoch=5)

    def step(*pairs):
        for optimizer, scheduler in pairs:
            optimizer.step()
            scheduler.step()

    (long_opt, long), (short_opt, short) = schedule(10), schedule(4)
    for _ in range(7):  # into the second epoch: past warmup, where the lengths differ
        step((long_opt, long), (short_opt, short))
    assert long_opt.param_groups[0]["lr"] != pytest.approx(short_opt.param_groups[0]["lr"])
    set_schedule_length(long, 4 * 5)
    for _ in range(13):
        assert long_opt.param_groups[0]["lr"] == pytest.approx(short_opt.param_groups[0]["lr"])
        assert long.get_last_lr() == pytest.approx(short.get_last_lr())
        step((long_opt, long), (short_opt, short))
    assert long_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)


def _fake_epoch_times(monkeypatch, seconds):
    """Epoch n takes seconds[n - 1] on a fake clock; everything else takes no time."""
    now = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    real_epoch = loop.train_one_epoch

    def timed_epoch(*args, **kwargs):
        now[0] += seconds[args[6] - 1]  # the epoch argument
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", timed_epoch)


def test_a_time_budget_ends_the_schedule_with_the_last_epoch_that_fits(tmp_path, monkeypatch,
                                                                       capsys):
    _fake_epoch_times(monkeypatch, [60.0] * 6)
    data = make_colour_folder(tmp_path / "data", per_class=4)
    cfg = tiny_config(data, tmp_path / "run", epochs=6, warmup_epochs=1, lr=1e-3, lrf=0.1,
                      time_budget=2.9, quiet=False)
    result = train(cfg)
    # after epoch 1, 114 s are left: one more 63 s epoch fits, not two
    assert [(r["epoch"], r["epochs"]) for r in result.history] == [(1, 2), (2, 2)]
    assert result.history[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # the cosine's end
    assert "time budget 2.9 min: epochs take 60 s, 2 fit" in capsys.readouterr().out
    state = load_training_state(tmp_path / "run" / "last.ckpt")
    steps = state["scheduler"]["last_epoch"] // 2
    assert state["scheduler"]["lr_lambdas"][0]["total_steps"] == 2 * steps  # resumed alike


def test_a_machine_that_slows_down_gets_a_shorter_schedule(tmp_path, monkeypatch):
    _fake_epoch_times(monkeypatch, [60.0, 120.0, 120.0, 20.0, 20.0, 20.0, 20.0])
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", epochs=7, warmup_epochs=1,
                               time_budget=7.0))
    # 420 s. After epoch 1: 360 s left, 63 s epochs -> 5 more (6). Epoch 2 (median 90 s,
    # 94.5 planned): 240 s left -> 2 more (4). Epoch 3 (median 120): 120 s left -> 0 more
    # (3): the run ends there
    assert [r["epochs"] for r in result.history] == [6, 4, 3]


def test_a_faster_machine_gets_a_longer_schedule_up_to_the_maximum(tmp_path, monkeypatch):
    _fake_epoch_times(monkeypatch, [100.0, 10.0, 10.0, 10.0, 10.0])
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", epochs=5, warmup_epochs=1,
                               time_budget=4.0))
    # 240 s: after epoch 1, 140 s left hold one more 105 s epoch; after epoch 2 (median 55,
    # 57.75 planned) 130 s left hold two more (4); after epoch 3 (median 10) all 5
    assert [r["epochs"] for r in result.history] == [2, 4, 5, 5, 5]


def test_without_a_budget_every_epoch_runs(tmp_path, monkeypatch):
    _fake_epoch_times(monkeypatch, [1e6] * 3)
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", epochs=3))
    assert [r["epochs"] for r in result.history] == [3, 3, 3]
