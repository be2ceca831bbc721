"""The Classifier interface: backend and dtype choice, bf16 autocast, and folder prediction
that decodes in parallel (draft mode for large JPEGs), keeps input order, and shards across
torchrun processes with the same output as one process."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vistra.accel.capabilities
import vistra.runtime
from vistra import create_model
from vistra.accel.capabilities import resolve_dtype
from vistra.cli import main
from vistra.data import load_rgb
from vistra.predict import predict_images
from vistra.runtime import load_classifier
from vistra.weights import save_checkpoint

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                         depth=1, num_heads=2, num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path, classes=CLASSES)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight small photos-like images and one broken file in the middle."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "img3b.png").write_bytes(b"not an image")
    return folder


def test_backend_follows_the_file_and_refuses_what_cannot_run(checkpoint, tmp_path):
    assert load_classifier(checkpoint, dtype="fp32").backend == "torch"
    in_memory = load_classifier(checkpoint, backend="onnx")
    assert in_memory.backend == "onnx" and not list(tmp_path.iterdir())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(in_memory(x), load_classifier(checkpoint, dtype="fp32")(x),
                               atol=1e-4, rtol=0)
    onnx_file = tmp_path / "tiny.onnx"
    assert main(["export", str(checkpoint), "--out", str(onnx_file)]) == 0
    with pytest.raises(ValueError, match="--backend onnx"):
        load_classifier(onnx_file, backend="torch")
    with pytest.raises(ValueError, match="bf16 is for the torch backend"):
        load_classifier(onnx_file, dtype="bf16")


def test_auto_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", "torch") == "bf16"
    assert resolve_dtype("auto", "onnx") == "fp32"
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", "torch") == "fp32"
    assert resolve_dtype("bf16", "torch") == "bf16"  # asked for: honoured (emulated)


def test_bf16_autocast_stays_close_to_fp32(checkpoint):
    x = torch.randn(4, 3, 32, 32)
    bf16 = load_classifier(checkpoint, dtype="bf16")
    assert bf16.dtype == "bf16"
    fp32 = load_classifier(checkpoint, dtype="fp32")(x)
    out = bf16(x)
    assert out.dtype == torch.float32 and not torch.equal(out, fp32)
    torch.testing.assert_close(out, fp32, atol=0.05, rtol=0.05)


def test_large_jpeg_is_decoded_in_draft_mode_with_the_same_prediction(tmp_path):
    """A 1600x1200 photo for a 224 input is decoded at half scale (still >= 2x the resize
    target), and the model's input and output barely move."""
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((1600, 1200), Image.Resampling.BICUBIC)
    photo.save(tmp_path / "cat.jpg", quality=92)
    assert load_rgb(tmp_path / "cat.jpg", min_side=512).size == (800, 600)
    assert load_rgb(tmp_path / "cat.jpg", min_side=700).size == (1600, 1200)  # no draft
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=3, depth=2).eval()
    model.classes = CLASSES
    classifier = vistra.runtime.module_classifier(model)
    full = classifier.transform(load_rgb(tmp_path / "cat.jpg"))
    (drafted,), _ = predict_images(model, [tmp_path / "cat.jpg"], topk=3)
    fast = classifier.transform(load_rgb(tmp_path / "cat.jpg", min_side=512))
    assert (fast - full).abs().mean() < 0.02
    reference = classifier(full[None]).softmax(1)[0]
    assert drafted.topk[0][0] == CLASSES[int(reference.argmax())]
    for name, p in drafted.topk:
        assert p == pytest.approx(float(reference[CLASSES.index(name)]), abs=2e-3)


def test_parallel_decoding_keeps_input_order(checkpoint, images):
    paths = sorted(images.iterdir())
    classifier = load_classifier(checkpoint, dtype="fp32")
    serial = predict_images(classifier, paths, batch_size=3, workers=1)
    parallel = predict_images(classifier, paths, batch_size=3, workers=4)
    assert parallel == serial
    predictions, failed = parallel
    assert [p.path for p in predictions] == [p for p in paths if p.name != "img3b.png"]
    assert failed == [(images / "img3b.png", "not an image")]


@pytest.mark.slow
def test_predict_under_torchrun_equals_one_process(checkpoint, images, capsys):
    args = ["predict", str(checkpoint), str(images), "--format", "csv", "--dtype", "fp32",
            "--batch-size", "2"]
    assert main(args) == 1  # one input is broken
    single = capsys.readouterr()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "vistra", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # every rank reports the broken input
    assert done.stdout == single.out
    assert done.stderr.count("skipped") == 1 and "img3b.png: not an image" in done.stderr
