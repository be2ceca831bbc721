"""The Fashion-MNIST path end to end at CI size: `vistra data fashion-mnist`, both recipes
for one short epoch through the ordinary image-folder loop, `vistra eval` on the test part;
and the small-image presets with their optional conv stem."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vistra
from vistra.cli import main
from vistra.data import FASHION_MNIST_CLASSES
from vistra.train import load_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TRAIN_PER_CLASS, TEST_PER_CLASS = 24, 4


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def idx_source(tmp_path_factory) -> Path:
    """Four IDX files shaped like the official ones (so the test needs no apt package):
    each class a bright square at its own place, which even one epoch starts to learn."""
    source = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, (len(labels), 28, 28))
        for image, label in zip(images, labels, strict=True):
            row, col = divmod(int(label), 5)
            image[2 + 12 * row: 12 + 12 * row, 1 + 5 * col: 6 + 5 * col] = 250
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return source


@pytest.fixture(scope="module")
def exported(idx_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmnist") / "data"
    assert main(["data", "fashion-mnist", str(out), "--source", str(idx_source)]) == 0
    return out


def test_export_writes_class_folders_of_28px_pngs(exported):
    for part, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        folders = sorted(p.name for p in (exported / part).iterdir())
        assert folders == sorted(FASHION_MNIST_CLASSES)
        for name in folders:
            assert len(list((exported / part / name).glob("*.png"))) == per_class
    image = Image.open(next((exported / "train" / "Bag").glob("*.png")))
    assert image.size == (28, 28) and image.mode == "L"


def test_export_refuses_a_used_folder_and_says_what_to_do(exported, idx_source, capsys):
    assert main(["data", "fashion-mnist", str(exported), "--source", str(idx_source)]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_export_without_source_says_how_to_install(tmp_path, capsys):
    assert main(["data", "fashion-mnist", str(tmp_path / "out"), "--source",
                 str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_recipe_trains_one_epoch_and_evaluates(name, exported, tmp_path, capsys):
    recipe = RECIPES / f"fashion_mnist_{name}.yaml"
    run = tmp_path / "run"
    code = main(["train", "--config", str(recipe), "--data", str(exported / "train"),
                 "--output", str(run), "--epochs", "1", "--workers", "0", "--quiet"])
    assert code == 0 and (run / "best.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", str(run / "best.safetensors"), "--data", str(exported / "test"),
                 "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["top1"] <= 1.0
    assert sum(map(sum, report["confusion"])) == 10 * TEST_PER_CLASS


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_recipe_selects_on_a_split_of_the_training_images(name):
    cfg = load_config(RECIPES / f"fashion_mnist_{name}.yaml")
    assert cfg.data is None  # the user passes DATA/train; test/ is never seen in training
    assert 0 < cfg.val_fraction < 0.5
    model = vistra.create_model(cfg.model, **cfg.model_overrides())
    assert model.data_config.img_size == (28, 28) and model.data_config.crop_pct == 1.0


def test_presets_take_28px_grey_images():
    x = torch.randn(2, 1, 28, 28)
    for name in ("vit_fmnist", "swin_fmnist"):
        model = vistra.create_model(name).eval()
        assert model(x).shape == (2, 10)
        assert model.data_config.mean[0] == pytest.approx(0.286, abs=1e-3)


def test_conv_stem_replaces_the_patch_conv_at_the_same_stride():
    plain = vistra.create_model("vit_fmnist", conv_stem=())
    stem = vistra.create_model("vit_fmnist")
    assert plain.pos_embed.shape == stem.pos_embed.shape == (1, 50, 64)  # 7x7 tokens + class
    assert not any(k.startswith("patch_embed.backbone") for k in plain.state_dict())
    assert plain.patch_embed.proj.weight.shape == (64, 1, 4, 4)
    assert stem.patch_embed.proj.weight.shape == (64, 128, 1, 1)  # 1x1 after the stem
    swin = vistra.create_model("swin_fmnist")
    tokens = swin.patch_embed(torch.randn(1, 1, 28, 28))
    assert tokens.shape[1:3] == (28 // swin.cfg.patch_size,) * 2


def test_conv_stem_needs_a_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two patch size"):
        vistra.create_model("vit_fmnist", patch_size=7, conv_stem=(16, 32))
    with pytest.raises(ValueError, match="hybrid_depths or conv_stem"):
        vistra.create_model("vit_base_r50_s16_224", conv_stem=(16, 32))
