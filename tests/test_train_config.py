"""TrainConfig: one typed place for every option, filled from Python, YAML or the CLI."""

import pytest
import torch

import vistra.accel.capabilities
import vistra.train.loop as loop
from vistra.train import TrainConfig, config_from_dict, load_config
from vistra.train.distributed import DistContext
from vistra.train.loop import choose_amp


def test_yaml_recipe_fills_the_dataclass_with_typed_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_tiny_patch16_224\nlr: 1\nbatch-size: 8\nscale: [0.5, 1]\n"
                      "model_kwargs: {patch_size: 4, depth: 6}\nfreeze_layers: true\n")
    cfg = load_config(recipe)
    assert cfg.model == "vit_tiny_patch16_224"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 8
    assert cfg.scale == (0.5, 1.0)
    assert cfg.model_kwargs == {"patch_size": 4, "depth": 6}
    assert cfg.freeze_layers is True
    assert cfg.epochs == TrainConfig().epochs  # untouched options keep their defaults


def test_overrides_win_over_the_file_and_model_kwargs_merge_by_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 30\nlr: 0.002\nmodel_kwargs: {patch_size: 4, depth: 6}\n")
    cfg = load_config(recipe, epochs=3, model_kwargs={"depth": 2})
    assert (cfg.epochs, cfg.lr) == (3, 0.002)
    assert cfg.model_kwargs == {"patch_size": 4, "depth": 2}


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.1\n", "unknown option 'learning_rate'"),
    ("epochs: ten\n", "epochs must be a int, got 'ten'"),
    ("scale: [0.5]\n", "scale must be a list of 2 numbers"),
    ("freeze_layers: 1\n", "freeze_layers must be a bool"),
    ("optimizer: adam\n", "optimizer must be one of adamw, sgd"),
    ("random_erasing: 25\n", "random_erasing must be a probability"),
    ("- lr\n", "must hold a mapping"),
])
def test_bad_recipes_are_rejected_naming_file_and_option(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config(recipe)
    if "optimizer" not in text and "erasing" not in text:
        assert "bad.yaml" in str(err.value)


def test_training_needs_data_and_model():
    with pytest.raises(ValueError, match="no data given: pass --data"):
        TrainConfig(model="vit_tiny_patch16_224").require_inputs()


def test_model_overrides_combine_named_options_and_model_kwargs():
    cfg = TrainConfig(img_size=28, in_chans=1, drop_path=0.1, model_kwargs={"depth": 2})
    assert cfg.model_overrides() == {"depth": 2, "img_size": 28, "in_chans": 1,
                                     "drop_path_rate": 0.1}
    with pytest.raises(ValueError, match="must not set img_size"):
        TrainConfig(model_kwargs={"img_size": 32}).model_overrides()


def test_to_dict_round_trips_through_plain_types():
    cfg = TrainConfig(data="d", model="m", scale=(0.3, 1.0), model_kwargs={"depth": 2})
    plain = cfg.to_dict()
    assert plain["scale"] == [0.3, 1.0]
    assert config_from_dict(plain) == cfg


@pytest.mark.parametrize("text", ["auto", "bf16", "fp16", "off"])
def test_amp_takes_its_four_words_from_yaml_off_included(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"amp: {text}\n")  # YAML reads a bare off as false
    assert load_config(recipe).amp == text


@pytest.mark.parametrize("text, amp", [("auto", "auto"), ("true", "bf16"), ("false", "off")])
def test_an_older_recipes_bf16_means_amp_bf16_off_or_auto(tmp_path, text, amp):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"bf16: {text}\n")
    assert load_config(recipe).amp == amp
    assert "bf16" not in load_config(recipe).to_dict()  # config.yaml records amp only
    # a last.ckpt written before amp holds bf16 in its config
    assert config_from_dict({"bf16": {"true": True, "false": False}.get(text, text)}).amp == amp


@pytest.mark.parametrize("value", ["sometimes", "Auto", 1])
def test_bf16_refuses_anything_else_naming_the_option(tmp_path, value):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"bf16: {value}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: bf16 must be true, false or auto"):
        load_config(recipe)
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, off"):
        TrainConfig(amp=str(value))


def test_bf16_and_amp_that_disagree_are_refused_and_the_command_line_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bf16: true\namp: fp16\n")
    with pytest.raises(ValueError, match="bf16: true means amp: bf16, but amp is 'fp16'"):
        load_config(recipe)
    recipe.write_text("bf16: true\n")
    assert load_config(recipe, amp="off").amp == "off"
    recipe.write_text("amp: fp16\n")
    assert load_config(recipe, bf16="auto").amp == "auto"


def _no_tf32(monkeypatch):
    monkeypatch.setattr(loop, "enable_tf32", lambda device: False)


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_decided_by_the_cpu_and_said_once(monkeypatch, capsys, native):
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: native)
    cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert choose_amp(TrainConfig(amp="auto"), cpu).amp == ("bf16" if native else "off")
    expected = ("amp: bf16 (auto: this CPU has bf16 arithmetic)" if native
                else "amp: off (auto: this CPU has no bf16 arithmetic)")
    assert capsys.readouterr().out.splitlines() == [
        f"device: this CPU ({'has' if native else 'no'} bf16 arithmetic)", expected]
    assert choose_amp(TrainConfig(amp="auto", quiet=True), cpu).amp in ("bf16", "off")
    other_rank = DistContext(rank=1, world_size=1, local_rank=1, device=torch.device("cpu"))
    assert choose_amp(TrainConfig(amp="auto"), other_rank).amp in ("bf16", "off")
    assert capsys.readouterr().out == ""  # quiet, and not rank 0


@pytest.mark.parametrize("capability, amp, why", [
    ((9, 0), "bf16", "the GPU computes bf16 natively"),
    ((7, 5), "fp16", "the GPU has no native bf16: fp16 with a gradient scaler")])
def test_amp_auto_on_a_gpu_is_bf16_from_ampere_on_and_fp16_before(monkeypatch, capsys,
                                                                   capability, amp, why):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    tf32 = []
    monkeypatch.setattr(loop, "enable_tf32", lambda device: tf32.append(device) or
                        capability >= (8, 0))
    gpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    assert choose_amp(TrainConfig(amp="auto"), gpu).amp == amp
    major, minor = capability
    said = f"device: Some GPU (compute capability {major}.{minor})"
    said += "; TF32 on for fp32 matrix products" if capability >= (8, 0) else ""
    assert capsys.readouterr().out.splitlines() == [said, f"amp: {amp} (auto: {why})"]
    assert tf32 == [torch.device("cuda", 0)]


def test_a_chosen_amp_passes_through(monkeypatch, capsys):
    _no_tf32(monkeypatch)
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: True)
    cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for value in ("bf16", "fp16", "off"):  # what a run asked for, or a resumed run recorded
        assert choose_amp(TrainConfig(amp=value, quiet=True), cpu).amp == value
    assert capsys.readouterr().out == ""
