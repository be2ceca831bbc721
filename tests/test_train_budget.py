"""Time budget: the number of epochs, and so where the cosine ends, fitted to measured speed."""

import types

import pytest
import torch
from test_train_e2e import make_colour_folder, tiny_config

import vistra.train.loop as loop
from vistra.train import train
from vistra.train.budget import epochs_within, warmup_end
from vistra.train.checkpoint import load_training_state
from vistra.train.config import TrainConfig
from vistra.train.optim import build_optimizer, build_scheduler, shorten_schedule


def test_epochs_within_counts_what_fits_with_a_safety_margin():
    # 100 s epochs are planned as 105 s: 1000 s left hold 9 of them, not 10
    assert epochs_within(1100, 100, 1, 100.0, 30) == 10
    assert epochs_within(1100, 100, 1, 100.0, 5) == 5  # never more than asked for
    assert epochs_within(1100, 1200, 3, 100.0, 30) == 3  # over budget: stop now
    assert warmup_end(0) == 1 and warmup_end(1) == 1 and warmup_end(1.5) == 2


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
    shorten_schedule(long, 4 * 5)
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
    assert "time budget 2.9 min: epoch 1 took 60 s, 2 epochs fit" in capsys.readouterr().out
    state = load_training_state(tmp_path / "run" / "last.ckpt")
    assert state["config"]["epochs"] == 2  # a resume keeps the fitted schedule


def test_a_machine_that_slows_down_gets_a_shorter_schedule(tmp_path, monkeypatch):
    _fake_epoch_times(monkeypatch, [60.0, 120.0, 120.0, 120.0])
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", epochs=10, warmup_epochs=1,
                               time_budget=5.0))
    # epoch 1: 240 s left hold three more 63 s epochs (4 in all); epoch 2 took 120 s, and
    # the 120 s left hold no more 126 s epochs
    assert [r["epochs"] for r in result.history] == [4, 2]


def test_without_a_budget_every_epoch_runs(tmp_path, monkeypatch):
    _fake_epoch_times(monkeypatch, [1e6] * 3)
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", epochs=3))
    assert [r["epochs"] for r in result.history] == [3, 3, 3]
