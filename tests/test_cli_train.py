"""`vistra train`: options generated from TrainConfig; command line > YAML > defaults."""

import dataclasses
import json

import pytest
from test_train_e2e import make_colour_folder

from vistra.cli import build_parser, main
from vistra.cli.train import config_from_args
from vistra.train import TrainConfig


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_config_field_is_a_command_line_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        flag = "--model-arg" if field.name == "model_kwargs" else \
            "--" + field.name.replace("_", "-")
        assert flag in text, flag


def test_command_line_overrides_yaml_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: vit_tiny_patch16_224\nepochs: 30\nlr: 0.002\nfreeze_layers: true\n"
                      "model_kwargs: {patch_size: 4, depth: 6}\n")
    cfg = _config(["--config", str(recipe), "--data", "d", "--epochs", "3",
                   "--no-freeze-layers", "--model-arg", "depth=2", "--scale", "0.5", "1"])
    assert (cfg.data, cfg.model, cfg.epochs, cfg.lr) == ("d", "vit_tiny_patch16_224", 3, 0.002)
    assert cfg.freeze_layers is False
    assert cfg.model_kwargs == {"patch_size": 4, "depth": 2}
    assert cfg.scale == (0.5, 1.0)
    assert cfg.batch_size == TrainConfig().batch_size


def test_options_without_a_config_file_and_boolean_flags():
    cfg = _config(["--data", "d", "--model", "m", "--freeze-layers", "--amp", "fp16", "--ema",
                   "--optimizer", "sgd", "--clip-grad", "1", "--in-chans", "1", "--compile"])
    assert (cfg.freeze_layers, cfg.amp, cfg.ema, cfg.optimizer) == (True, "fp16", True, "sgd")
    assert cfg.compile is True
    assert (cfg.clip_grad, cfg.in_chans) == (1.0, 1)
    with pytest.raises(SystemExit):
        _config(["--optimizer", "adam"])


@pytest.mark.parametrize("argv, amp", [(["--bf16"], "bf16"), (["--bf16", "true"], "bf16"),
                                       (["--bf16", "false"], "off"), (["--no-bf16"], "off"),
                                       (["--bf16", "auto"], "auto"), ([], "off"),
                                       (["--amp", "auto"], "auto")])
def test_the_older_bf16_flag_takes_true_false_or_auto_as_amp(argv, amp):
    assert _config(["--data", "d", "--model", "m", *argv, "--ema"]).amp == amp


def test_amp_refuses_another_word(capsys):
    with pytest.raises(SystemExit):
        _config(["--amp", "fp8"])
    assert "argument --amp: invalid choice: 'fp8'" in capsys.readouterr().err


def test_bf16_refuses_another_word_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        _config(["--bf16", "yes"])
    assert "argument --bf16: expected true, false or auto, got 'yes'" in capsys.readouterr().err


def test_cli_trains_and_resume_refuses_other_options(tmp_path, capsys):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--model", "vit_tiny_patch16_224", "--output",
            str(run), "--epochs", "1", "--img-size", "16", "--batch-size", "4", "--workers",
            "0", "--model-arg", "patch_size=8", "--model-arg", "depth=1", "--model-arg",
            "embed_dim=32", "--model-arg", "num_heads=2", "--freeze-layers", "--amp", "bf16",
            "--optimizer", "sgd", "--lr", "0.01"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "best validation top-1" in out
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").open()] == [1]

    assert main(["train", "--resume", str(run), "--epochs", "5"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert main(["train", "--model", "vit_tiny_patch16_224"]) == 2
    assert "no data given" in capsys.readouterr().err
