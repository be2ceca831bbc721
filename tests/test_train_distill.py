"""Training with a teacher: the distillation losses, the teacher's own preprocessing, what
each head of a distilled student learns, the teacher's identity in the run's files, and the
`--head` choice of eval and predict."""

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from test_evaluate import image_folder
from test_train_e2e import TINY, ctrl_c_in_epoch, make_colour_folder, tiny_config
from test_weights_hub import add_repo, json_file, transformers_layout

import vistra.train.loop as loop
from vistra import create_model
from vistra.cli import main
from vistra.data import build_eval_transform
from vistra.evaluate import evaluate_checkpoint
from vistra.models import DistilledLogits
from vistra.onnx import export_checkpoint
from vistra.train import resume, train
from vistra.train.checkpoint import load_training_state
from vistra.train.loss import Distillation, teacher_loss, training_loss
from vistra.train.teacher import (
    InputFormat,
    Teacher,
    TeacherIdentity,
    TeacherModel,
    load_teacher,
    weights_sha256,
)
from vistra.weights import read_metadata, save_checkpoint

# --- the losses, by hand -------------------------------------------------------------------

STUDENT = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]  # two images, three classes
SECOND_HEAD = [[-1.0, 2.5, 0.0], [1.0, 0.0, 0.5]]
TEACHER = [[0.5, 3.0, 1.0], [2.0, -1.0, 0.0]]  # top classes 1 and 0
LABELS = [0, 2]


def _softmax(row, tau=1.0):
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def _ce(rows, targets):
    losses = [-math.log(_softmax(row)[t]) for row, t in zip(rows, targets, strict=True)]
    return sum(losses) / len(rows)


def _kl(rows, teacher_rows, tau):
    total = 0.0
    for row, teacher in zip(rows, teacher_rows, strict=True):
        p, q = _softmax(teacher, tau), _softmax(row, tau)
        total += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
    return total / len(rows) * tau * tau


@pytest.mark.parametrize("kind, tau", [("hard", 1.0), ("soft", 1.0), ("soft", 3.0)])
@pytest.mark.parametrize("distilled", [True, False])
def test_the_loss_equals_a_hand_computation(kind, tau, distilled):
    alpha = 0.3
    teacher_top = [max(range(3), key=row.__getitem__) for row in TEACHER]
    taught = SECOND_HEAD if distilled else STUDENT  # the head that learns the teacher
    by_hand = _ce(taught, teacher_top) if kind == "hard" else _kl(taught, TEACHER, tau)
    expected = (1 - alpha) * _ce(STUDENT, LABELS) + alpha * by_hand

    output = (DistilledLogits(torch.tensor(STUDENT), torch.tensor(SECOND_HEAD)) if distilled
              else torch.tensor(STUDENT))
    loss = training_loss(output, torch.tensor(LABELS), teacher_logits=torch.tensor(TEACHER),
                         distillation=Distillation(kind, alpha, tau))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert teacher_loss(torch.tensor(taught), torch.tensor(TEACHER), kind, tau).item() == \
        pytest.approx(by_hand, rel=1e-5)


def test_without_a_teacher_both_heads_learn_the_labels():
    output = DistilledLogits(torch.tensor(STUDENT), torch.tensor(SECOND_HEAD))
    expected = (_ce(STUDENT, LABELS) + _ce(SECOND_HEAD, LABELS)) / 2
    assert training_loss(output, torch.tensor(LABELS)).item() == pytest.approx(expected,
                                                                              rel=1e-6)


# --- the teacher's inputs ------------------------------------------------------------------

GREY_16 = InputFormat((16, 16), 1, (0.5,), (0.25,))
GREY_16_AT_8 = InputFormat((8, 8), 1, (0.5,), (0.5,))
RGB_32 = InputFormat((32, 32), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _recording_teacher(input_format, classes, seen):
    """A teacher that keeps its inputs in `seen` and answers 0, 1, 2, ... for its classes."""
    def run(batch):
        seen.append(batch)
        return torch.arange(len(classes), dtype=torch.float32).expand(batch.shape[0], -1)

    identity = TeacherIdentity("t.safetensors", "t.safetensors", "0" * 64, "a teacher")
    return TeacherModel(identity, input_format, classes, len(classes), run, "fp32")


def test_a_grey_level_student_gives_an_rgb_teacher_of_another_size_its_own_inputs():
    level = 100  # a uniform grey image: every pixel of every view is known exactly
    student_batch = torch.full((2, 1, 16, 16), (level / 255 - 0.5) / 0.25)
    seen = []
    teacher = Teacher.fit(_recording_teacher(RGB_32, ["a", "b"], seen), GREY_16, ["a", "b"])
    teacher(student_batch)
    (given,) = seen
    assert given.shape == (2, 3, 32, 32)
    for c in range(3):
        expected = (level / 255 - RGB_32.mean[c]) / RGB_32.std[c]
        assert torch.allclose(given[:, c], torch.tensor(expected), atol=1e-5)


def test_an_rgb_student_gives_a_grey_level_teacher_the_luminance():
    rgb = (200, 40, 90)
    student = InputFormat((16, 16), 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    batch = torch.stack([torch.full((16, 16), (v / 255 - 0.5) / 0.5) for v in rgb])[None]
    seen = []
    Teacher.fit(_recording_teacher(GREY_16, ["a"], seen), student, ["a"])(batch)
    grey = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    assert seen[0].shape == (1, 1, 16, 16)
    assert torch.allclose(seen[0], torch.tensor((grey - 0.5) / 0.25), atol=1e-5)


def test_a_resized_view_matches_the_teachers_own_preprocessing_of_the_image():
    """A smooth image, as the student's transform makes it at 16 px, converted for a
    32 px RGB teacher, is close to the teacher's own transform of the image."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    student_format = InputFormat((16, 16), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    student_view = build_eval_transform((16, 16), student_format.mean, student_format.std,
                                        1.0, "bicubic")(image)
    teacher_view = build_eval_transform((32, 32), RGB_32.mean, RGB_32.std, 1.0, "bicubic")(image)
    seen = []
    Teacher.fit(_recording_teacher(RGB_32, ["a"], seen), student_format, ["a"])(
        student_view[None])
    assert (seen[0][0] - teacher_view).abs().mean() < 0.05


def test_the_same_format_passes_the_batch_through_untouched():
    batch = torch.randn(2, 3, 32, 32)
    seen = []
    Teacher.fit(_recording_teacher(RGB_32, ["a"], seen), RGB_32, ["a"])(batch)
    assert seen[0] is batch


def test_the_teachers_classes_are_put_in_the_folders_order_or_refused():
    seen = []
    swapped = Teacher.fit(_recording_teacher(RGB_32, ["b", "a", "c"], seen), RGB_32,
                          ["a", "b", "c"])
    assert swapped(torch.zeros(1, 3, 32, 32)).tolist() == [[1.0, 0.0, 2.0]]
    with pytest.raises(ValueError, match=r"teacher t.safetensors knows 2 classes \(a, x\), the "
                                         r"data has 2 \(a, b\)"):
        Teacher.fit(_recording_teacher(RGB_32, ["a", "x"], seen), RGB_32, ["a", "b"])
    unnamed = TeacherModel(TeacherIdentity("t", "t", "0" * 64, "m"), RGB_32, None, 1000,
                           lambda batch: batch, "fp32")
    with pytest.raises(ValueError, match="has 1000 classes, the data 2"):
        Teacher.fit(unnamed, RGB_32, ["a", "b"])


# --- runs with a teacher -------------------------------------------------------------------

RULE_COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30),
                "yellow": (220, 220, 30)}
NAMES = sorted(RULE_COLOURS)


def _rule_folder(root, per_class, seed, rule=lambda i: i):
    """Noisy solid colours; the images of colour i go in the folder of class rule(i)."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(NAMES):
        folder = root / NAMES[rule(i)]
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            noisy = np.array(RULE_COLOURS[name]) + rng.normal(0, 20, (16, 16, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
                folder / f"{name}{k}.png")
    return root


def _next(i):
    return (i + 1) % len(NAMES)  # the teacher's rule: each colour is called the next class


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An untrained teacher of the four colours (16 px RGB), for runs that only need one."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=4, **TINY)
    save_checkpoint(model, path, classes=NAMES)
    return path


def _head_accuracy(model, folder, head, tmp_path):
    path = tmp_path / f"student-{head}.safetensors"
    save_checkpoint(model, path, classes=NAMES)
    report, _ = evaluate_checkpoint(path, folder, head=head)
    return report.totals.top1


def _distilled_student(data, output, **kw):
    return tiny_config(data, output, model_kwargs={**TINY, "distilled": True}, epochs=8,
                       lr=3e-3, scale=(0.5, 1.0), **kw)


@pytest.mark.slow  # two runs: the teacher's and the student's, about 40 s on 2 cores
def test_hard_distillation_teaches_the_class_head_the_labels_and_the_other_the_teacher(
        tmp_path):
    # The teacher is trained to call each colour by the next colour's name.
    teaching = _rule_folder(tmp_path / "teaching", 12, seed=1, rule=_next)
    teacher = train(tiny_config(teaching, tmp_path / "teacher", epochs=6, lr=3e-3,
                                scale=(0.5, 1.0)))
    assert teacher.best_top1 >= 0.9
    data = _rule_folder(tmp_path / "data", 12, seed=2)
    result = train(_distilled_student(data, tmp_path / "run", distill="hard",
                                      teacher=str(teacher.run_dir / "best.safetensors")))
    held_out = _rule_folder(tmp_path / "test", 8, seed=3)
    as_teacher_says = _rule_folder(tmp_path / "test_teacher", 8, seed=3, rule=_next)
    assert _head_accuracy(result.model, held_out, "cls", tmp_path) >= 0.9
    assert _head_accuracy(result.model, as_teacher_says, "dist", tmp_path) >= 0.9


def test_without_a_teacher_the_second_head_learns_the_labels_too(tmp_path):
    data = _rule_folder(tmp_path / "data", 12, seed=2)
    result = train(_distilled_student(data, tmp_path / "run"))
    held_out = _rule_folder(tmp_path / "test", 8, seed=3)
    assert _head_accuracy(result.model, held_out, "dist", tmp_path) >= 0.9


def test_an_rgb_teacher_of_another_size_teaches_a_grey_level_student(tmp_path, teacher_file,
                                                                     capsys):
    """The teacher (16 px RGB) and the student (8 px grey level) each get their own
    inputs; the run records the teacher's identity and settings."""
    data = _rule_folder(tmp_path / "data", 4, seed=2)
    config = tiny_config(data, tmp_path / "run", epochs=1, img_size=8, in_chans=1,
                         model_kwargs={**TINY, "patch_size": 4}, teacher=str(teacher_file),
                         distill_tau=2.0, quiet=False)
    seen = []
    real_fit = Teacher.fit

    def recording_fit(model, student, classes):
        fitted = real_fit(model, student, classes)
        real_run = model.run
        model.run = lambda batch: seen.append(batch.shape) or real_run(batch)
        return fitted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Teacher, "fit", staticmethod(recording_fit))
        result = train(config)
    assert seen and all(shape[1:] == (3, 16, 16) for shape in seen)
    sha = load_training_state(result.run_dir / "last.ckpt")["config"]["teacher_sha256"]
    assert len(sha) == 64
    text = (result.run_dir / "config.yaml").read_text()
    assert text.startswith(f"# teacher: vit_tiny_patch16_224 from teacher.safetensors, "
                           f"sha256 {sha}\n")
    recorded = yaml.safe_load(text)
    assert (recorded["teacher"], recorded["teacher_sha256"], recorded["distill_tau"]) == \
        (str(teacher_file), sha, 2.0)
    card = read_metadata(result.run_dir / "best.safetensors")["extra"]["teacher"]
    assert card == {"source": str(teacher_file), "file": "teacher.safetensors", "sha256": sha,
                    "model": "vit_tiny_patch16_224", "distill": "soft", "alpha": 0.5,
                    "tau": 2.0}
    assert "teacher: vit_tiny_patch16_224 from teacher.safetensors" in capsys.readouterr().out


def test_an_exported_teacher_answers_as_its_checkpoint(tmp_path, teacher_file):
    onnx_file = tmp_path / "teacher.onnx"
    export_checkpoint(teacher_file, onnx_file)
    batch = torch.randn(3, 1, 8, 8)  # a grey-level student's, at another size
    answers = []
    for source in (teacher_file, onnx_file):
        model = load_teacher(str(source), dtype="fp32")
        assert (model.identity.model, model.input_format.size) == ("vit_tiny_patch16_224",
                                                                  (16, 16))
        answers.append(Teacher.fit(model, GREY_16_AT_8, NAMES)(batch))
    assert torch.allclose(*answers, atol=1e-4)


def test_a_teacher_named_in_the_local_cache_answers_as_its_weights(tmp_path, monkeypatch):
    """A transformers-layout repository in a HuggingFace cache built here, offline: the
    teacher is that model, its classes put in the folder's order, its identity the repo
    name and the SHA-256 of its weights."""
    torch.manual_seed(0)
    reference = create_model("vit_tiny_patch16_224", num_classes=4).eval()
    its_order = NAMES[::-1]  # the repository names the classes in another order
    add_repo(tmp_path / "hub", "acme/vit-colours", {
        "config.json": json_file({"architectures": ["ViTForImageClassification"],
                                  "model_type": "vit", "image_size": 224,
                                  "id2label": {str(i): n for i, n in enumerate(its_order)}}),
        "model.safetensors": lambda p: save_file(
            transformers_layout(reference.state_dict()), str(p))})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = load_teacher("acme/vit-colours", dtype="fp32")
    assert teacher.identity.source == "acme/vit-colours"
    assert teacher.identity.sha256 == weights_sha256(reference)
    assert teacher.input_format.size == (224, 224) and teacher.classes == its_order
    batch = torch.randn(2, 3, 224, 224)
    same_format = InputFormat.of(reference.data_config, 3)
    got = Teacher.fit(teacher, same_format, NAMES)(batch)
    with torch.no_grad():
        expected = reference(batch)[:, [its_order.index(name) for name in NAMES]]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_resumed_run_with_a_teacher_equals_an_uninterrupted_one(tmp_path, teacher_file,
                                                                  monkeypatch):
    data = _rule_folder(tmp_path / "data", 4, seed=2)
    options = dict(teacher=str(teacher_file), model_kwargs={**TINY, "distilled": True},
                   mixup=0.4)
    straight = train(tiny_config(data, tmp_path / "straight", **options))
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", **options))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    resume(tmp_path / "cut")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert straight.history[-1]["epoch"] == 2


def test_resume_refuses_another_teacher_in_one_line(tmp_path, teacher_file, capsys):
    data = _rule_folder(tmp_path / "data", 4, seed=2)
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_file, teacher)
    run = train(tiny_config(data, tmp_path / "run", epochs=1, teacher=str(teacher))).run_dir
    other = tmp_path / "other.safetensors"
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=4, **TINY)
    save_checkpoint(model, other, classes=NAMES)

    with pytest.raises(ValueError, match=re.escape(f"it learnt from the teacher {teacher}, "
                                                   f"{other} is another")):
        resume(run, teacher=str(other))
    assert main(["train", "--resume", str(run), "--teacher", str(other)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "resume it with the teacher it started with" in error

    moved = tmp_path / "moved.safetensors"
    shutil.copy(teacher, moved)
    resume(run, teacher=str(moved))  # the same teacher elsewhere: accepted
    shutil.copy(other, teacher)  # the teacher file replaced in place
    with pytest.raises(ValueError, match=re.escape(f"its teacher {teacher} has changed")):
        resume(run)


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from vistra.train import TrainConfig, train
    data, out, teacher, weights = sys.argv[1:5]
    result = train(TrainConfig(
        data=data, model="vit_tiny_patch16_224", output=out, img_size=16, epochs=1,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                      "distilled": True},
        batch_size=2, lr=1e-3, workers=0, quiet=True, teacher=teacher, accum_steps=2,
        balance="sampler", layer_decay=0.8))
    torch.save(result.model.state_dict(), f"{weights}{os.environ['RANK']}.pt")
""")


def test_each_torchrun_process_runs_the_teacher_and_all_end_with_one_model(tmp_path,
                                                                           teacher_file):
    data = _rule_folder(tmp_path / "data", 4, seed=2)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    weights = tmp_path / "weights_rank"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(data), str(tmp_path / "run"), str(teacher_file), str(weights)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(f"{weights}0.pt", weights_only=True)
    rank1 = torch.load(f"{weights}1.pt", weights_only=True)
    assert all(torch.equal(v, rank1[k]) for k, v in rank0.items())
    state = load_training_state(tmp_path / "run" / "last.ckpt")
    per_process = -(-state["run"]["data"]["train"] // 2)
    assert state["run"]["steps_per_epoch"] == -(-per_process // 4)  # 2 batches of 2 per step
    assert state["config"]["teacher_sha256"] is not None


def test_a_run_without_a_teacher_is_not_resumed_with_one(tmp_path, teacher_file):
    data = _rule_folder(tmp_path / "data", 4, seed=2)
    run = train(tiny_config(data, tmp_path / "run", epochs=1)).run_dir
    with pytest.raises(ValueError, match="was trained without a teacher"):
        resume(run, teacher=str(teacher_file))


def test_a_teacher_of_other_classes_is_refused(tmp_path, teacher_file):
    data = make_colour_folder(tmp_path / "data", per_class=4)  # blue, green, red
    with pytest.raises(ValueError, match="knows 4 classes"):
        train(tiny_config(data, tmp_path / "run", epochs=1, teacher=str(teacher_file)))


def test_teacher_options_are_checked():
    with pytest.raises(ValueError, match="distill need a teacher"):
        tiny_config("d", "o", distill="hard")
    with pytest.raises(ValueError, match="distill_alpha must be in"):
        tiny_config("d", "o", teacher="t", distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_tau must be positive"):
        tiny_config("d", "o", teacher="t", distill_tau=0)


# --- --head in eval and predict ------------------------------------------------------------

def _two_minded_checkpoint(path):
    """A distilled model whose class head always says "a" and distillation head "b"."""
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=2, distilled=True,
                         **TINY)
    with torch.no_grad():
        for head, favourite in ((model.head, 0), (model.head_dist, 1)):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[favourite] = 10.0
    save_checkpoint(model, path, classes=["a", "b"])
    return path


def test_eval_and_predict_answer_with_the_head_asked_for(tmp_path, capsys):
    ckpt = _two_minded_checkpoint(tmp_path / "m.safetensors")
    data = image_folder(tmp_path / "d", {"a": 3})
    for head, top1 in (("cls", 1.0), ("dist", 0.0), ("mean", None)):
        report, _ = evaluate_checkpoint(ckpt, data, head=head)
        if top1 is not None:
            assert report.totals.top1 == top1
    assert main(["eval", str(ckpt), "--data", str(data), "--head", "dist", "--json",
                 "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 0.0
    assert main(["predict", str(ckpt), str(data / "a"), "--head", "dist", "--format",
                 "json", "--topk", "1"]) == 0
    assert {r["topk"][0]["class"] for r in json.loads(capsys.readouterr().out)} == {"b"}
    assert main(["predict", str(ckpt), str(data / "a"), "--head", "cls", "--format",
                 "json", "--topk", "1"]) == 0
    assert {r["topk"][0]["class"] for r in json.loads(capsys.readouterr().out)} == {"a"}


def test_a_one_headed_model_refuses_cls_and_dist(tmp_path, capsys):
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=2, **TINY)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(model, ckpt, classes=["a", "b"])
    data = image_folder(tmp_path / "d", {"a": 1})
    assert main(["eval", str(ckpt), "--data", str(data), "--head", "cls", "--workers",
                 "0"]) == 2
    assert "--head cls is for distilled models" in capsys.readouterr().err
    assert main(["predict", str(ckpt), str(data), "--head", "dist"]) == 2
    assert "use --head mean" in capsys.readouterr().err
