"""`vistra eval`: a text report or one JSON object, and a confusion-matrix PNG."""

import json

from PIL import Image
from test_evaluate import constant_checkpoint, image_folder

from vistra.cli import main


def test_json_output_and_plot(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    data = image_folder(tmp_path / "d", {"a": 3, "b": 1})
    plot = tmp_path / "cm.png"
    assert main(["eval", str(ckpt), "--data", str(data), "--json", "--plot", str(plot),
                 "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "per_class", "confusion"} <= set(result)
    assert result["top1"] == 0.75
    assert result["confusion"] == [[3, 0], [1, 0]]
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 300


def test_text_report_and_default_plot_beside_the_checkpoint(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="b")
    data = image_folder(tmp_path / "photos", {"a": 2, "b": 2})
    assert main(["eval", str(ckpt), "--data", str(data), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1: 50.00%" in out and "confusion matrix" in out
    assert (tmp_path / "confusion_photos.png").is_file()


def test_mismatched_classes_fail_with_a_clear_message(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    data = image_folder(tmp_path / "d", {"a": 1, "c": 1})
    assert main(["eval", str(ckpt), "--data", str(data), "--workers", "0"]) == 2
    assert "does not know: c" in capsys.readouterr().err
