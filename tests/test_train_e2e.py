"""Training end to end on a small generated image folder: what the run leaves behind, and
that the checkpoint alone reproduces its answers in `eval` and `predict`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vistra.train.loop as loop
from vistra import create_model
from vistra.evaluate import evaluate_checkpoint
from vistra.predict import predict_images
from vistra.train import TrainConfig, train
from vistra.weights import load_checkpoint, read_metadata, save_checkpoint

COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def make_colour_folder(root, per_class=12, size=20, seed=0):
    """root/<colour>/*.png of noisy solid colours, plus the awkward files real folders hold:
    a grayscale PNG, an RGBA PNG, a corrupt PNG and a text file."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noisy = np.array(rgb) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    Image.new("L", (size, size), 90).save(root / "blue" / "gray.png")
    Image.new("RGBA", (size, size), (30, 200, 30, 128)).save(root / "green" / "rgba.png")
    (root / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def tiny_config(data, output, **kw):
    """Two epochs of a one-block ViT on 16x16 inputs: a second or two on a CPU. Without the
    explain choice at the end (a second or two more), which `run` and
    test_explain_choose.py test."""
    options = dict(data=str(data), model="vit_tiny_patch16_224", output=str(output),
                   img_size=16, model_kwargs=TINY, epochs=2, batch_size=8, lr=1e-3, workers=0,
                   quiet=True, explain_choose=False)
    return TrainConfig(**{**options, **kw})


def ctrl_c_in_epoch(monkeypatch, epoch: int):
    """From now on, training raises KeyboardInterrupt when it starts `epoch` (1-based), as a
    Ctrl-C there would; returns the real epoch function, to put back before resuming."""
    real_epoch = loop.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[6] == epoch:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    return real_epoch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_colour_folder(root / "colours")
    result = train(tiny_config(data, root / "run", workers=2, ema=True, ema_decay=0.9,
                               explain_choose=True))
    return data, result


def test_run_directory_holds_every_output(run):
    _, result = run
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"best.safetensors", "last.ckpt", "class_indices.json", "class_counts.png",
            "metrics.jsonl", "training_curves.png", "config.yaml", "tensorboard"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_class_indices_match_the_folder_names(run):
    data, result = run
    indices = json.loads((result.run_dir / "class_indices.json").read_text())
    assert indices == {"0": "blue", "1": "green", "2": "red"}
    assert indices == {str(i): p.name for i, p in enumerate(sorted(data.iterdir()))}


def test_bad_files_are_skipped_up_front_and_odd_modes_are_used(run):
    data, result = run
    assert sorted(p.name for p, _ in result.split.skipped) == ["corrupt.png", "notes.txt"]
    used = {p.name for p, _ in result.split.train + result.split.val}
    assert {"gray.png", "rgba.png"} <= used


def test_metrics_file_has_one_line_per_epoch_and_accuracy_beats_chance(run):
    _, result = run
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert set(lines[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_top1",
                             "val_top5", "lr", "seconds", "epochs", "ema_val_top1"}
    assert lines == result.history
    assert result.best_top1 > 1 / 3 + 0.2
    assert max(max(r["val_top1"], r["ema_val_top1"]) for r in lines) == result.best_top1


def test_best_checkpoint_records_what_prediction_needs(run):
    _, result = run
    meta = read_metadata(result.run_dir / "best.safetensors")
    assert meta["model_name"] == "vit_tiny_patch16_224"
    assert meta["classes"] == ["blue", "green", "red"]
    assert meta["data_config"]["img_size"] == [16, 16]
    assert meta["arch"]["patch_size"] == 8
    assert meta["extra"]["weights"] == result.best_weights in ("model", "ema")
    assert meta["extra"]["epoch"] == result.best_epoch
    assert meta["extra"]["top1"] == result.best_top1


def test_last_checkpoint_is_plain_data_for_weights_only_loading(run):
    _, result = run
    state = torch.load(result.run_dir / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    assert state["classes"] == ["blue", "green", "red"]
    assert state["config"]["model_kwargs"] == TINY
    assert {"model", "optimizer", "scheduler", "ema"} <= set(state)
    final = result.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in state["model"].items())


def test_eval_and_predict_from_the_checkpoint_alone_agree_with_training(run):
    data, result = run
    best = result.run_dir / "best.safetensors"
    report, _ = evaluate_checkpoint(best, data, holdout=True)
    assert report.totals.count == len(result.split.val)
    assert report.totals.top1 == pytest.approx(result.best_top1)

    model = load_checkpoint(best)
    predictions, failed = predict_images(model, [p for p, _ in result.split.val], topk=1)
    assert not failed
    labels = [model.classes[label] for _, label in result.split.val]
    hits = sum(p.topk[0][0] == label for p, label in zip(predictions, labels, strict=True))
    assert hits / len(labels) == pytest.approx(report.totals.top1)


def test_the_split_is_the_same_in_every_run_and_disjoint(tmp_path, run):
    data, first = run
    second = train(tiny_config(data, tmp_path / "again", epochs=1))
    assert (second.split.train, second.split.val) == (first.split.train, first.split.val)
    train_files = {p for p, _ in first.split.train}
    val_files = {p for p, _ in first.split.val}
    assert not train_files & val_files
    usable = {p for p in data.rglob("*") if p.is_file()} - {p for p, _ in first.split.skipped}
    assert train_files | val_files == usable


def test_a_new_run_refuses_to_overwrite_an_existing_one(run):
    data, result = run
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(tiny_config(data, result.run_dir))


def test_head_only_fine_tuning_from_weights_keeps_the_backbone(tmp_path):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    donor = create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, **TINY)
    save_checkpoint(donor, tmp_path / "donor.safetensors", classes=list("abcde"))
    result = train(tiny_config(data, tmp_path / "run", epochs=1, freeze_layers=True, lr=0.1,
                               weights=str(tmp_path / "donor.safetensors")))
    tuned = load_checkpoint(tmp_path / "run" / "best.safetensors").state_dict()
    for name, value in donor.state_dict().items():
        if name.startswith("head."):
            assert tuned[name].shape[0] == 3, name  # a new head for the folder's classes
        else:
            assert torch.equal(tuned[name], value), name
    assert result.model.blocks[0].attn.qkv.weight.requires_grad is False


def test_a_distilled_deit_trains_both_heads_on_the_labels(tmp_path):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    result = train(tiny_config(data, tmp_path / "run", epochs=1,
                               model="deit_tiny_distilled_patch16_224"))
    initial = create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=16,
                           **TINY)
    assert result.model.head_dist.weight.shape == initial.head_dist.weight.shape
    assert not torch.equal(result.model.head_dist.weight, initial.head_dist.weight)
    assert 0 <= result.history[0]["val_top1"] <= 1


def test_threads_hold_for_the_run_and_the_callers_count_comes_back(tmp_path, monkeypatch):
    """--threads 1 trains on one thread; the process keeps its own count after (the demo
    once left a pytest process on one thread, and every model trained after it rounded
    differently)."""
    data = make_colour_folder(tmp_path / "data", per_class=4)
    seen = []
    real_epoch = loop.train_one_epoch

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(tiny_config(data, tmp_path / "run", threads=1))
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
