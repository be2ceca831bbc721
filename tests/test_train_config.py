"""TrainConfig: one typed place for every option, filled from Python, YAML or the CLI."""

import pytest

from vistra.train import TrainConfig, config_from_dict, load_config


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
