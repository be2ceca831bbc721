"""`vistra demo`: train, evaluate and predict on the bundled Fashion-MNIST sample."""

import yaml
from PIL import Image

import vistra.cli.demo
from vistra.cli import main
from vistra.cli.demo import DEMO_RECIPE
from vistra.train import load_config


def test_the_demo_recipe_is_a_valid_training_config():
    cfg = load_config(DEMO_RECIPE)
    assert cfg.model and cfg.data is None and cfg.output is None  # the demo supplies them
    assert cfg.img_size == 28 and cfg.epochs > 1


def test_demo_trains_evaluates_on_test_and_predicts_examples(tmp_path, monkeypatch, capsys):
    """The bundled folder's layout (train/ + test/, 28x28 grey PNGs) in miniature."""
    sample = tmp_path / "sample"
    for part, n in (("train", 4), ("test", 2)):
        for c in range(6):
            (sample / part / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("L", (28, 28), 40 * c + i).save(sample / part / f"class{c}" / f"{i}.png")
    monkeypatch.setattr(vistra.cli.demo, "bundled_demo_dir", lambda: sample)
    recipe = tmp_path / "quick.yaml"
    recipe.write_text(DEMO_RECIPE.read_text() + "\nmodel_kwargs: {patch_size: 7, embed_dim: 16,"
                      " depth: 1, num_heads: 1}\nepochs: 1\nworkers: 0\n")
    run = tmp_path / "demo"
    assert main(["demo", "--config", str(recipe), "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "images: 12" in out and "demo finished in" in out
    # the checkpoint was chosen on images held out of train/; test/ is reported only at the end
    assert "checkpoint chosen on 6 validation images held out of" in out
    assert out.index("checkpoint chosen on") < out.index("test top-1")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(sample / "train")

    assert out.count(f"{sample / 'test'}/class") == 5  # one example of five classes
    assert {"best.safetensors", "confusion_test.png", "predictions"} <= {
        p.name for p in run.iterdir()}
    assert len(list((run / "predictions").iterdir())) == 5
