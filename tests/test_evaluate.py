"""Evaluation: accuracy, per-class precision/recall and the confusion matrix, with folder
classes matched to the checkpoint's classes by name."""

import pytest
import torch
from PIL import Image

from vistra import create_model
from vistra.evaluate import EvalReport, EvalTotals, evaluate_checkpoint, run_evaluation
from vistra.weights import save_checkpoint


def constant_checkpoint(path, classes, favourite):
    """A checkpoint whose model predicts `favourite` for every image (head weights zero)."""
    model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                         embed_dim=32, num_heads=2, num_classes=len(classes))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(len(classes), 0, -1).float())  # ranks by index
        model.head.bias[classes.index(favourite)] = 100.0
    save_checkpoint(model, path, classes=classes)
    return path


def image_folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_metrics_follow_from_the_confusion_matrix():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])  # rows true, columns predicted
    report = EvalReport(["a", "b", "c"], EvalTotals(loss_sum=4.0, top5_correct=8,
                                                    confusion=confusion))
    out = report.to_dict()
    assert out["top1"] == 5 / 8 and out["top5"] == 1.0 and out["loss"] == 0.5
    assert out["per_class"] == [
        {"class": "a", "precision": 1.0, "recall": 0.75, "support": 4},
        {"class": "b", "precision": 2 / 3, "recall": 0.5, "support": 4},
        {"class": "c", "precision": 0.0, "recall": None, "support": 0},
    ]
    assert out["confusion"] == confusion.tolist()
    assert "top-1: 62.50%" in report.format()


def test_top5_counts_a_hit_when_the_label_is_among_the_five_best():
    classes = list("abcdefg")
    model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                         embed_dim=32, num_heads=2, num_classes=7)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(7, 0, -1).float())  # a > b > ... > g always
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 4, 5, 6])
    totals = run_evaluation(model, [(images, labels)], len(classes), torch.device("cpu"))
    assert totals.top1 == 0.25 and totals.top5 == 0.5
    assert totals.confusion[:, 0].tolist() == [1, 0, 0, 0, 1, 1, 1]  # all predicted "a"


class LeftRight(torch.nn.Module):
    """Logits d * [1, 0, -1] + [0, 0.8, 0], d the left half's mean minus the right half's:
    mirroring an image flips the sign of d, so each view alone favours class 0 or 2, while
    class 1 is everyone's close second."""

    def forward(self, x):
        half = x.shape[-1] // 2
        d = x[..., :half].mean((1, 2, 3)) - x[..., half:].mean((1, 2, 3))
        return d[:, None] * torch.tensor([1.0, 0.0, -1.0]) + torch.tensor([0.0, 0.8, 0.0])


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror_image():
    images = torch.zeros(2, 1, 4, 4)
    images[:, :, :, :2] = torch.tensor([1.0, -1.0])[:, None, None, None]  # bright, dark left
    labels = torch.tensor([1, 1])
    plain = run_evaluation(LeftRight(), [(images, labels)], 3, torch.device("cpu"))
    both = run_evaluation(LeftRight(), [(images, labels)], 3, torch.device("cpu"), flip=True)
    assert plain.confusion[1].tolist() == [1, 0, 1]  # each view alone: class 0 or class 2
    # mean of softmax([1, 0.8, -1]) and softmax([-1, 0.8, 1]): class 1 wins for both images
    assert both.confusion[1].tolist() == [0, 2, 0]
    view = torch.softmax(torch.tensor([1.0, 0.8, -1.0]), 0)
    mean = (view + view.flip(0)) / 2
    assert both.loss == pytest.approx(-float(mean[1].log()), rel=1e-5)


def test_folder_classes_are_matched_by_name_and_the_test_part_is_used(tmp_path):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b", "c"], favourite="b")
    data = tmp_path / "data"
    image_folder(data / "train", {"b": 2, "c": 2})
    image_folder(data / "test", {"b": 3, "c": 1})  # no "a": a test folder may lack classes
    report, skipped = evaluate_checkpoint(ckpt, data)
    assert not skipped
    assert report.totals.confusion.tolist() == [[0, 0, 0], [0, 3, 0], [0, 1, 0]]
    assert report.totals.top1 == 0.75
    recall = {row["class"]: row["recall"] for row in report.per_class()}
    assert recall == {"a": None, "b": 1.0, "c": 0.0}


def test_a_class_per_folder_directory_is_evaluated_whole(tmp_path):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    report, _ = evaluate_checkpoint(ckpt, image_folder(tmp_path / "d", {"a": 5, "b": 5}))
    assert report.totals.count == 10 and report.totals.top1 == 0.5


def test_unknown_class_folders_are_an_error_naming_them(tmp_path):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    data = image_folder(tmp_path / "d", {"a": 1, "zebra": 1})
    with pytest.raises(ValueError, match="does not know: zebra; its classes are a, b"):
        evaluate_checkpoint(ckpt, data)


def test_holdout_needs_a_checkpoint_from_training(tmp_path):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    data = image_folder(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="does not record how training split"):
        evaluate_checkpoint(ckpt, data, holdout=True)
