"""Resume: an interrupted run continued with `resume` ends exactly like an uninterrupted one."""

import json

import pytest
import torch
import yaml
from test_train_e2e import ctrl_c_in_epoch, make_colour_folder, tiny_config

import vistra.accel.capabilities
import vistra.train.loop as loop
from vistra.train import resume, train
from vistra.train.checkpoint import load_training_state, save_training_state

RANDOM_EVERYWHERE = dict(epochs=2, workers=1, drop_path=0.1, mixup=0.4, cutmix=1.0,
                         randaugment_ops=2, warmup_epochs=0.5, ema=True, ema_decay=0.9,
                         label_smoothing=0.1, clip_grad=1.0)


def _without_time(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, capsys):
    data = make_colour_folder(tmp_path / "data")
    straight = train(tiny_config(data, tmp_path / "straight", **RANDOM_EVERYWHERE))

    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", **RANDOM_EVERYWHERE))
    assert "holds the state after epoch 1" in capsys.readouterr().err
    assert load_training_state(tmp_path / "cut" / "last.ckpt")["epoch"] == 1
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)

    resumed = resume(tmp_path / "cut")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["ema"]["module"][k]) for k, v in a["ema"]["module"].items())
    assert _without_time(resumed.history) == _without_time(straight.history)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert (resumed.best_top1, resumed.best_epoch) == (straight.best_top1, straight.best_epoch)


def test_an_interruption_in_the_first_epoch_is_resumable(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    ctrl_c_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "run", epochs=1))
    assert load_training_state(tmp_path / "run" / "last.ckpt")["epoch"] == 0


def test_a_resumed_run_keeps_the_amp_choice_auto_made_at_its_start(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: True)
    real_epoch = ctrl_c_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):  # in epoch 1: the choice is all there is to resume
        train(tiny_config(data, run, epochs=1, amp="auto"))
    assert load_training_state(run / "last.ckpt")["config"]["amp"] == "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["amp"] == "bf16"

    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: False)  # another machine
    seen = []

    def record_amp(*args, **kwargs):
        seen.append(args[4].amp)  # the config argument
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", record_amp)
    resume(run)
    assert seen == ["bf16"]
    assert load_training_state(run / "last.ckpt")["config"]["amp"] == "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["amp"] == "bf16"


def test_training_state_is_written_atomically_and_checked_on_load(tmp_path):
    path = tmp_path / "last.ckpt"
    with pytest.raises(ValueError, match="lacks"):
        save_training_state({"epoch": 1}, path)
    assert not path.exists()
    (tmp_path / "other.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        load_training_state(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="--resume needs a run directory"):
        resume(tmp_path / "nowhere")


def test_seeded_item_depends_only_on_its_seed_and_leaves_the_callers_rng_alone():
    from vistra.train.data import SeededDataset

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.rand(3)

    dataset = SeededDataset(Draws())
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first, same_seed, other_seed = dataset[(0, 7)], dataset[(1, 7)], dataset[(0, 8)]
    assert torch.equal(first, same_seed) and not torch.equal(first, other_seed)
    assert torch.equal(torch.rand(1), expected_next)
