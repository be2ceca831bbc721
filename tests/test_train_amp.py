"""Training under --amp and --compile, on a CPU: an interrupted and resumed run still ends
exactly as an uninterrupted one (the fp16 loss scale saved in last.ckpt and restored), a
compiled model keeps its weights and checkpoint keys, and its first step is reported apart."""

import os

import pytest
import torch
from test_train_e2e import ctrl_c_in_epoch, make_colour_folder, tiny_config
from test_train_resume import RANDOM_EVERYWHERE, _without_time

import vistra.train.loop as loop
from vistra.train import resume, train
from vistra.train.checkpoint import load_training_state, save_training_state


def _same_weights(a_dir, b_dir) -> bool:
    a = torch.load(a_dir / "last.ckpt", weights_only=True)
    b = torch.load(b_dir / "last.ckpt", weights_only=True)
    return a["model"].keys() == b["model"].keys() and all(
        torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_resumed_mixed_precision_run_equals_the_uninterrupted_run(tmp_path, monkeypatch, amp):
    data = make_colour_folder(tmp_path / "data")
    options = dict(RANDOM_EVERYWHERE, amp=amp)
    straight = train(tiny_config(data, tmp_path / "straight", **options))

    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", **options))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    resumed = resume(tmp_path / "cut")

    assert _same_weights(tmp_path / "straight", tmp_path / "cut")
    assert _without_time(resumed.history) == _without_time(straight.history)
    scalers = [load_training_state(tmp_path / run / "last.ckpt")["scaler"]
               for run in ("straight", "cut")]
    assert scalers[0] == scalers[1]
    assert ("scale" in scalers[0]) == (amp == "fp16")  # only fp16 scales its loss


def test_the_fp16_loss_scale_is_restored_from_last_ckpt(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, run, amp="fp16"))
    state = load_training_state(run / "last.ckpt")
    assert state["scaler"]["scale"] > 0
    state["scaler"] = {**state["scaler"], "scale": 1024.0, "_growth_tracker": 7}
    save_training_state(state, run / "last.ckpt")

    seen = []

    def record_scale(*args, **kwargs):
        scaler = kwargs["scaler"]
        seen.append((scaler.is_enabled(), scaler.get_scale(), scaler._get_growth_tracker()))
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", record_scale)
    resume(run)
    assert seen == [(True, 1024.0, 7)]


def test_an_older_checkpoint_without_a_scaler_resumes(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, run))
    state = load_training_state(run / "last.ckpt")
    del state["scaler"]
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("amp", "compile")}
    state["config"]["bf16"] = False  # as vistra wrote it before --amp
    save_training_state(state, run / "last.ckpt")
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    assert resume(run).history[-1]["epoch"] == 2


def test_compile_compiles_the_model_in_place_and_reports_the_first_step_apart(
        tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(self))
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", compile=True, quiet=False))
    assert compiled == [result.model]
    out = capsys.readouterr().out
    assert out.count("torch.compile: the first step took") == 1  # in the first epoch only
    assert load_training_state(tmp_path / "run" / "last.ckpt")["config"]["compile"] is True


def test_a_loss_that_is_not_finite_stops_the_run_naming_the_epoch(tmp_path, monkeypatch):
    real_loss = loop._loss
    monkeypatch.setattr(loop, "_loss", lambda *a: real_loss(*a) * float("nan"))
    data = make_colour_folder(tmp_path / "data", per_class=4)
    with pytest.raises(FloatingPointError, match="loss became nan in epoch 1; lower --lr"):
        train(tiny_config(data, tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VISTRA_TEST_COMPILE") != "1",
                    reason="compiling takes minutes on a small CPU; set VISTRA_TEST_COMPILE=1")
def test_a_compiled_run_resumes_exactly_and_its_checkpoint_is_the_plain_models(
        tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    straight = train(tiny_config(data, tmp_path / "straight", compile=True))
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", compile=True))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    resumed = resume(tmp_path / "cut")
    assert _same_weights(tmp_path / "straight", tmp_path / "cut")
    assert _without_time(resumed.history) == _without_time(straight.history)
    keys = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)["model"].keys()
    assert not [k for k in keys if "_orig_mod" in k]
