"""Prediction from a checkpoint: top-k with probabilities, output formats, annotation, and
unreadable files reported instead of crashing."""

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import constant_checkpoint

from vistra import create_model
from vistra.data import find_images
from vistra.predict import (
    Prediction,
    annotate,
    format_predictions,
    predict_images,
)
from vistra.weights import load_checkpoint, save_checkpoint

CLASSES = ["cat", "dog", "emu", "fox"]


@pytest.fixture
def model(tmp_path):
    return load_checkpoint(constant_checkpoint(tmp_path / "m.safetensors", CLASSES, "emu"))


def _image(path, size=(24, 18), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
    return path


def test_topk_lists_the_most_likely_classes_with_probabilities(model, tmp_path):
    predictions, failed = predict_images(model, [_image(tmp_path / "x.png")], topk=3)
    assert not failed
    (p,) = predictions
    assert [name for name, _ in p.topk] == ["emu", "cat", "dog"]
    probs = [v for _, v in p.topk]
    assert probs[0] == pytest.approx(1.0) and probs == sorted(probs, reverse=True)
    everything, _ = predict_images(model, [p.path], topk=10)
    assert len(everything[0].topk) == len(CLASSES)
    assert sum(v for _, v in everything[0].topk) == pytest.approx(1.0)


def test_unreadable_files_are_reported_and_the_rest_predicted(model, tmp_path):
    good = [_image(tmp_path / "a.png"), _image(tmp_path / "b.png", mode="L")]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    predictions, failed = predict_images(model, [good[0], bad, good[1]], batch_size=1)
    assert [p.path for p in predictions] == good
    assert [path for path, _ in failed] == [bad]


def test_folders_are_searched_recursively_for_image_files(tmp_path):
    a = _image(tmp_path / "in" / "a.png")
    b = _image(tmp_path / "in" / "sub" / "b.webp")
    (tmp_path / "in" / "readme.txt").write_text("skip me")
    (tmp_path / "empty").mkdir()
    images, missing = find_images([tmp_path / "in", tmp_path / "nope.png", tmp_path / "empty"])
    assert images == [a, b]
    assert [(p.name, reason) for p, reason in missing] == [
        ("nope.png", "no such file or folder"), ("empty", "folder holds no image files")]


def test_output_formats():
    preds = [Prediction(__import__("pathlib").Path("x.png"), [("emu", 0.75), ("cat", 0.25)])]
    assert format_predictions(preds) == "x.png: emu 75.0%, cat 25.0%"
    assert json.loads(format_predictions(preds, "json")) == [
        {"path": "x.png", "topk": [{"class": "emu", "probability": 0.75},
                                   {"class": "cat", "probability": 0.25}]}]
    rows = list(csv.reader(io.StringIO(format_predictions(preds, "csv"))))
    assert rows == [["path", "rank", "class", "probability"], ["x.png", "1", "emu", "0.750000"],
                    ["x.png", "2", "cat", "0.250000"]]
    with pytest.raises(ValueError, match="format must be one of text, json, csv"):
        format_predictions(preds, "xml")


def test_annotation_draws_the_label_on_an_enlarged_copy(tmp_path):
    source = _image(tmp_path / "small.png", size=(28, 28))
    out = annotate(Prediction(source, [("emu", 0.9)]), tmp_path / "out" / "small.png")
    with Image.open(out) as image:
        assert image.size == (320, 320)
        pixels = [image.getpixel((x, y)) for x in range(0, 60) for y in range(0, 12)]
    assert min(sum(p) for p in pixels) < 3 * 128 - 100  # the dark banner
    assert max(sum(p) for p in pixels) > 3 * 200  # the white text
    with Image.open(source) as original:
        assert original.size == (28, 28)


def test_flip_gives_the_mean_of_the_image_and_its_mirror_image(tmp_path):
    torch.manual_seed(0)
    net = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                       embed_dim=32, num_heads=2, num_classes=len(CLASSES))
    save_checkpoint(net, tmp_path / "r.safetensors", classes=CLASSES)
    trained = load_checkpoint(tmp_path / "r.safetensors")
    # no resize or crop: the preprocessing must not itself tell an image from its mirror
    trained.data_config = dataclasses.replace(trained.data_config, crop_pct=1.0)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[:, ::-1]).save(tmp_path / "mirror.png")

    def probs(paths, flip):
        predictions, _ = predict_images(trained, paths, topk=4, flip=flip)
        return [dict(p.topk) for p in predictions]

    plain, mirror = probs([tmp_path / "a.png", tmp_path / "mirror.png"], flip=False)
    (both,) = probs([tmp_path / "a.png"], flip=True)
    assert plain != pytest.approx(mirror)  # the two views disagree, so the mean is a test
    assert both == pytest.approx({c: (plain[c] + mirror[c]) / 2 for c in CLASSES}, rel=1e-5)
