"""The default explain method chosen by measurement (vistra.explain.choose): the most
faithful method wins, the record travels in the checkpoint with its weights untouched,
`vistra explain` follows it and says why, and training ends by recording one within its
time."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train_e2e import make_colour_folder, tiny_config

from vistra.cli import main
from vistra.explain import choose, default_method, default_reason
from vistra.explain.choose import choose_method, most_faithful, relative_deletion
from vistra.models import ExplainChoice, VisionTransformer, ViTConfig
from vistra.train import resume, train
from vistra.weights import load_checkpoint, read_metadata, save_checkpoint, save_explain_choice

CLASSES = ["blue", "green", "red"]


class RoundedInput(VisionTransformer):
    """A ViT that first rounds its input to steps of 1/4: its gradient is zero at every
    pixel, so the gradient map holds nothing, while hiding a region (occlusion) still shows
    what the answer depends on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.round(x * 4) / 4)


def tiny_vit(cls=VisionTransformer, num_classes=3) -> VisionTransformer:
    torch.manual_seed(0)
    model = cls(ViTConfig(img_size=16, patch_size=4, num_classes=num_classes, embed_dim=16,
                          depth=2, num_heads=2))
    with torch.no_grad():  # weights far from their initialisation: every region matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def scores(**relative: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """A score table from (deletion, road, insertion) per method, random order's all 0.5."""
    table = {m: dict(zip(("deletion", "road", "insertion"), v, strict=True))
             for m, v in relative.items()}
    return {**table, "random": {"deletion": 0.5, "road": 0.5, "insertion": 0.5}}


def a_choice(method="occlusion", images=4, data="somewhere", by="test") -> ExplainChoice:
    return ExplainChoice(method, scores(**{method: (0.2, 0.3, 0.7)}), images, data, 16, by)


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_vit()
    model.classes = CLASSES
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    return path


def test_the_rule_takes_both_deletions_and_breaks_ties_by_insertion():
    # mean-colour deletion alone would pick a, ROAD alone b; the mean of both c
    table = scores(a=(0.10, 0.60, 0.5), b=(0.60, 0.10, 0.5), c=(0.20, 0.20, 0.5))
    assert most_faithful(table) == "c"
    assert relative_deletion(table, "c") == pytest.approx(0.4)
    # within the tie margin, the higher insertion wins
    assert most_faithful(scores(a=(0.2, 0.2, 0.6), b=(0.2, 0.201, 0.9))) == "b"
    assert most_faithful(scores(a=(0.2, 0.2, 0.6), b=(0.3, 0.3, 0.9))) == "a"


def test_occlusion_beats_a_gradient_that_holds_nothing():
    model = tiny_vit(RoundedInput, num_classes=5)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(x).argmax(1)  # explain what it answers, so the probability is high
    choice = choose_method(model, x, labels, data="noise", by="test",
                           methods=["gradient", "occlusion"], steps=8)
    assert choice.method == "occlusion"
    assert relative_deletion(choice.scores, "occlusion") < 0.8
    assert relative_deletion(choice.scores, "gradient") > 0.9  # a constant map: random order
    assert (choice.images, choice.steps, set(choice.scores)) == \
        (6, 8, {"gradient", "occlusion", "random"})


def test_scoring_stops_within_the_time_allowed(monkeypatch):
    """A clock that advances one second per image and method: the images that fit are
    scored, and a method that does not fit in the first image is left out."""
    now = [0.0]
    real = choose.explain_batch

    def slow(model, x, method, target):
        now[0] += len(x)
        return real(model, x, method, target)

    monkeypatch.setattr(choose, "explain_batch", slow)
    monkeypatch.setattr(choose, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    model = tiny_vit()
    x, labels = torch.randn(20, 3, 16, 16), torch.zeros(20, dtype=torch.long)
    choice = choose_method(model, x, labels, data="d", by="t", steps=2, seconds=9,
                           methods=["gradient", "occlusion"])
    # 2 s per image: the first alone, then 3 more (8 s); a fifth would end at 10 s
    assert (choice.images, now[0]) == (4, 8)
    now[0] = 0.0
    choice = choose_method(model, x, labels, data="d", by="t", steps=2, seconds=0.5,
                           methods=["gradient", "occlusion"])
    assert (choice.images, set(choice.scores)) == (1, {"gradient", "random"})
    skipped = choose.skipped_methods(model, choice)
    assert skipped["occlusion"] == choose.OUT_OF_TIME and "window" not in skipped


def test_the_record_round_trips_with_the_weights_byte_for_byte(checkpoint, tmp_path):
    choice = a_choice()
    out = save_explain_choice(checkpoint, choice, tmp_path / "chosen.safetensors")
    loaded = load_checkpoint(out)
    assert loaded.card.explain == choice
    assert read_metadata(out)["explain"] == choice.to_dict()
    assert _tensor_bytes(out) == _tensor_bytes(checkpoint)
    before, after = load_file(checkpoint), load_file(out)
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    resaved = tmp_path / "resaved.safetensors"
    save_checkpoint(loaded, resaved)  # the card carries it on
    assert load_checkpoint(resaved).card.explain == choice
    assert load_checkpoint(checkpoint).card.explain is None


def test_a_failed_write_leaves_no_file_and_an_existing_one_is_kept(checkpoint, tmp_path,
                                                                   monkeypatch):
    original = checkpoint.read_bytes()
    with pytest.raises(FileExistsError):
        save_explain_choice(checkpoint, a_choice(), checkpoint)
    assert checkpoint.read_bytes() == original

    def torn(source, target, length):
        target.write(source.read(100))
        raise OSError("disk full")

    monkeypatch.setattr("vistra.weights.vistra_file.shutil.copyfileobj", torn)
    with pytest.raises(OSError, match="disk full"):
        save_explain_choice(checkpoint, a_choice(), tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert checkpoint.read_bytes() == original


def test_a_damaged_record_is_refused_as_damaged_metadata(checkpoint, tmp_path):
    out = save_explain_choice(checkpoint, a_choice(), tmp_path / "chosen.safetensors")
    data = out.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"]["explain"] = json.dumps({"method": 3})
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])
    with pytest.raises(ValueError, match="damaged vistra metadata"):
        load_checkpoint(out)


def test_the_default_is_the_recorded_method_while_it_applies():
    model = tiny_vit()
    assert default_method(model) == "rise"
    assert default_reason(model) == "the vit family's default (no recorded choice)"
    model.card.explain = a_choice("occlusion", images=7, data="flowers/val")
    assert default_method(model) == "occlusion"
    assert default_reason(model).startswith(
        "recorded by test on 7 images of flowers/val: ROAD deletion 0.60x and mean-colour "
        "deletion 0.40x the random order's")
    model.card.explain = a_choice("gradcam")  # a Swin method: not this model's
    assert default_method(model) == "rise"
    assert "the recorded gradcam does not apply" in default_reason(model)
    model.reset_classifier(4)  # a new head: what was measured no longer holds
    assert model.card.explain is None


def test_cli_choose_saves_a_copy_that_explain_then_follows(checkpoint, tmp_path, capsys):
    data = make_colour_folder(tmp_path / "colours", per_class=2)
    saved = tmp_path / "chosen.safetensors"
    assert main(["explain", str(checkpoint), "--choose", "--data", str(data), "--limit", "3",
                 "--save", str(saved)]) == 0
    out, err = capsys.readouterr()
    choice = load_checkpoint(saved).card.explain
    assert (choice.images, choice.data, choice.by) == (3, str(data), "vistra explain --choose")
    assert set(choice.scores) == {"rollout", "grad-rollout", "occlusion", "rise", "gradient",
                                  "lrp", "random"}
    assert f"{choice.method} " in out and "<- chosen" in out and f"written {saved}" in err
    assert _tensor_bytes(saved) == _tensor_bytes(checkpoint)

    image = data / "red" / "0.png"
    assert main(["explain", str(saved), str(image), "--out", str(tmp_path / "maps")]) == 0
    err = capsys.readouterr().err
    assert f"method: {choice.method}, recorded by vistra explain --choose on 3 images of " \
           f"{data}: ROAD deletion" in err
    assert (tmp_path / "maps" / f"{image.stem}.{choice.method}.png").is_file()

    assert main(["explain", str(checkpoint), str(image), "--out", str(tmp_path / "m2")]) == 0
    assert "method: rise, the vit family's default (no recorded choice)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/nowhere"], "image folder {tmp}/nowhere does not exist"),
    (["--data", "{tmp}", "--save", "{tmp}/model.safetensors"],
     "is the checkpoint itself; vistra does not rewrite its inputs"),
    (["--data", "{tmp}", "--save", "{tmp}/taken"], "{tmp}/taken already exists; use --force"),
    ([], "--choose needs --data DIR"),
])
def test_cli_choose_refusals_are_one_line(checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "taken").write_text("mine")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["explain", str(checkpoint), "--choose", *argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and len(err.splitlines()) == 1
    assert (tmp_path / "taken").read_text() == "mine"


def test_save_belongs_to_choose(checkpoint, tmp_path, capsys):
    assert main(["explain", str(checkpoint), "x.png", "--out", str(tmp_path), "--save",
                 str(tmp_path / "c.safetensors")]) == 2
    assert "--save belongs to --choose" in capsys.readouterr().err


def test_training_ends_by_recording_the_choice_in_best(tmp_path, capsys):
    data = make_colour_folder(tmp_path / "colours", per_class=6)
    result = train(tiny_config(data, tmp_path / "run", epochs=1, quiet=False,
                               explain_choose=True, explain_choose_images=3,
                               explain_choose_seconds=5))
    best = result.run_dir / "best.safetensors"
    choice = load_checkpoint(best).card.explain
    assert (choice.by, choice.data) == ("vistra train", f"{data} (validation)")
    assert 1 <= choice.images <= 3
    assert f"explain: {choice.method}, the most faithful of" in capsys.readouterr().out
    # a finished run resumed without the choice keeps the record
    resume(result.run_dir, explain_choose=False)
    assert load_checkpoint(best).card.explain == choice


def _tensor_bytes(path) -> bytes:
    """What follows a safetensors file's header: the tensors' bytes."""
    data = path.read_bytes()
    return data[8 + struct.unpack("<Q", data[:8])[0]:]
