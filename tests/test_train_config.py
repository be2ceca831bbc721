"""TrainConfig: one typed place for every option, filled from Python, YAML or the CLI."""

from dataclasses import replace

import pytest
import torch

import vistra.accel.capabilities
from vistra.train import TrainConfig, config_from_dict, load_config
from vistra.train.distributed import DistContext
from vistra.train.loop import resolve_bf16


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


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("true", True), ("false", False)])
def test_bf16_takes_true_false_or_auto_from_yaml(tmp_path, text, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"bf16: {text}\n")
    bf16 = load_config(recipe).bf16
    assert bf16 == value and type(bf16) is type(value)


@pytest.mark.parametrize("value", ["sometimes", "Auto", 1])
def test_bf16_refuses_anything_else_naming_the_option(tmp_path, value):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"bf16: {value}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: bf16 must be a bool or auto"):
        load_config(recipe)
    with pytest.raises(ValueError, match="bf16 must be true, false or auto"):
        TrainConfig(bf16=value)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_is_decided_by_the_cpu_and_said_once(monkeypatch, capsys, native):
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: native)
    cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert resolve_bf16(TrainConfig(bf16="auto"), cpu).bf16 is native
    expected = ("bf16: on (auto: this CPU has bf16 arithmetic)" if native
                else "bf16: off (auto: this CPU has no bf16 arithmetic)")
    assert capsys.readouterr().out == expected + "\n"
    assert resolve_bf16(TrainConfig(bf16="auto", quiet=True), cpu).bf16 is native
    other_rank = DistContext(rank=1, world_size=1, local_rank=1, device=torch.device("cpu"))
    assert resolve_bf16(TrainConfig(bf16="auto"), other_rank).bf16 is native
    assert capsys.readouterr().out == ""  # quiet, and not rank 0


def test_bf16_auto_is_on_for_cuda_and_true_or_false_pass_through(monkeypatch, capsys):
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: False)
    gpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    assert resolve_bf16(TrainConfig(bf16="auto"), gpu).bf16 is True
    assert capsys.readouterr().out == "bf16: on (auto: a CUDA device)\n"
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: True)
    cpu = replace(gpu, device=torch.device("cpu"))
    for value in (True, False):  # what a run asked for, or what a resumed run recorded
        assert resolve_bf16(TrainConfig(bf16=value), cpu).bf16 is value
    assert capsys.readouterr().out == ""
