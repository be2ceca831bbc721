"""A user's files are never destroyed, and every failure a user can cause ends in one clear
line: annotated copies never replace a file, `convert` never replaces one unasked, a run
directory is never reused or shared, interrupted writes leave whole files, and a resume
refuses to continue a different run."""

import fcntl
import json
import os
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_evaluate import constant_checkpoint
from test_train_e2e import ctrl_c_in_epoch, make_colour_folder, tiny_config

import vistra
import vistra.train.loop as loop
from vistra.cli import main
from vistra.fileio import append_line, atomic_write_text
from vistra.predict import Prediction, annotate_all
from vistra.train import resume, train
from vistra.train.checkpoint import load_training_state, save_training_state
from vistra.train.distributed import TIMEOUT, init_distributed
from vistra.train.logger import read_metrics


def _photos(folder, n=2):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (30, 20), (i * 90, 90, 10)).save(folder / f"{i}.png")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _one_error_line(capsys):
    """The error: one line, the last on standard error (reports of skipped files may come
    before it), and no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and ": error: " in lines[-1], lines
    assert sum(": error: " in line for line in lines) == 1, lines
    return lines[-1]


# --- predict --annotate --------------------------------------------------------------------

def test_annotating_into_the_input_folder_leaves_every_input_unchanged(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    photos = tmp_path / "photos"
    before = _photos(photos)
    assert main(["predict", str(ckpt), str(photos), "--annotate", str(photos)]) == 0
    assert {name: (photos / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in photos.iterdir()) == [
        "0.png", "0.vistra.png", "1.png", "1.vistra.png"]
    # a second run would replace the copies: it refuses, naming the file, and writes nothing
    copies = {p: p.read_bytes() for p in photos.glob("*.vistra.png")}
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(photos / "1.png"), "--annotate", str(photos)]) == 2
    assert "1.vistra.png already exists" in _one_error_line(capsys)
    assert {p: p.read_bytes() for p in photos.glob("*.vistra.png")} == copies


def test_annotate_all_checks_every_name_before_writing_any(tmp_path):
    photos = tmp_path / "photos"
    _photos(photos)
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.vistra.png").write_bytes(b"mine")
    predictions = [Prediction(photos / f"{i}.png", [("a", 1.0)]) for i in range(2)]
    with pytest.raises(FileExistsError, match="1.vistra.png"):
        annotate_all(predictions, out)
    assert sorted(p.name for p in out.iterdir()) == ["1.vistra.png"]
    assert (out / "1.vistra.png").read_bytes() == b"mine"


def test_annotating_a_1x50000_strip_stays_within_a_few_megapixels(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 50000), (200, 10, 10)).save(strip)
    [written] = annotate_all([Prediction(strip, [("a", 1.0)])], tmp_path / "out")
    with Image.open(written) as image:
        assert image.width * image.height <= 4_000_000
        assert image.height >= 50000  # enlarged as far as the cap allows, never shrunk


# --- convert -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "vit.pth"
    torch.save(vistra.create_model("vit_tiny_patch16_224", num_classes=3).state_dict(), path)
    return path


def test_convert_replaces_an_existing_output_only_with_force(tmp_path, timm_file, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    args = ["convert", str(timm_file), str(dst), "--model", "vit_tiny_patch16_224"]
    assert main(args) == 2
    assert "already exists; pass --force" in _one_error_line(capsys)
    assert dst.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0
    assert vistra.weights.read_metadata(dst)["model_name"] == "vit_tiny_patch16_224"


def test_convert_never_replaces_the_weights_of_a_source_folder(tmp_path, capsys):
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"the original weights")
    assert main(["convert", str(hf), str(hf / "model.safetensors"), "--model",
                 "vit_tiny_patch16_224", "--force"]) == 2
    assert "file of the source folder" in _one_error_line(capsys)
    assert (hf / "model.safetensors").read_bytes() == b"the original weights"


# --- train: the run directory --------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("faults") / "data", per_class=4)


@pytest.mark.parametrize("existing", ["metrics.jsonl", "config.yaml", "best.safetensors"])
def test_a_new_run_refuses_a_directory_holding_any_run_file(tmp_path, data, existing):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / existing).write_text("kept")
    with pytest.raises(ValueError, match=f"already holds a run \\({existing}\\)"):
        train(tiny_config(data, run_dir, epochs=1))
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", existing]
    assert (run_dir / existing).read_text() == "kept"
    with open(run_dir / ".lock") as lock:  # released when train() ended
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:  # as a training process would hold it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="in use by another vistra training process"):
            train(tiny_config(data, run_dir, epochs=1))
    assert not (run_dir / "config.yaml").exists()


# --- atomic writes and a torn metrics line -------------------------------------------------

def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old: 1\n")

    def killed_half_way(tmp):
        tmp.write_text("new: ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vistra.fileio.atomic_write(target, killed_half_way)
    assert target.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture()
def finished_run(tmp_path, data):
    result = train(tiny_config(data, tmp_path / "run", epochs=2))
    return result


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(finished_run, capsys):
    run_dir = finished_run.run_dir
    append_line(run_dir / "metrics.jsonl", '{"epoch": 3, "train_lo')
    capsys.readouterr()
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    assert "dropped a torn last line" in capsys.readouterr().err


def test_resume_rewrites_metrics_from_the_checkpoint(finished_run):
    """Killed between last.ckpt and the metrics line of epoch 2: the resumed run's file holds
    epochs 1 and 2 once each, from the checkpoint's records."""
    run_dir = finished_run.run_dir
    state = load_training_state(run_dir / "last.ckpt")
    assert state["history"] == finished_run.history
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:10])  # torn epoch 2
    resume(run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    assert read_metrics(run_dir) == finished_run.history


# --- resume refuses a different run --------------------------------------------------------

def test_resume_refuses_when_the_files_changed(finished_run, data):
    Image.new("RGB", (20, 20), (30, 30, 220)).save(data / "blue" / "added.png")
    try:
        with pytest.raises(ValueError, match=r"images have changed .*train \d+ -> \d+"):
            resume(finished_run.run_dir)
    finally:
        (data / "blue" / "added.png").unlink()


@pytest.mark.parametrize("key, value, message", [
    ("world_size", 2, "trained by 2 process"),
    ("steps_per_epoch", 99, "had 99 steps"),
])
def test_resume_refuses_another_process_count_or_epoch_length(finished_run, key, value,
                                                             message):
    path = finished_run.run_dir / "last.ckpt"
    state = load_training_state(path)
    state["run"][key] = value
    save_training_state({k: v for k, v in state.items() if k != "format"}, path)
    with pytest.raises(ValueError, match=message):
        resume(finished_run.run_dir)


def test_resume_takes_a_new_lr_but_no_option_that_changes_the_run(finished_run, capsys):
    run_dir = finished_run.run_dir
    assert main(["train", "--resume", str(run_dir), "--lr", "5e-4", "--quiet"]) == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 5e-4
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--batch-size", "2"]) == 2
    assert "it accepts --lr, --clip-grad" in _one_error_line(capsys)


def test_a_new_lr_scales_the_rest_of_the_schedule(tmp_path, data, monkeypatch):
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "a", epochs=2))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    base = resume(tmp_path / "a", lr=1e-3).history
    half = resume(tmp_path / "b", lr=5e-4).history
    assert [r["epoch"] for r in half] == [1, 2] and half[0] == base[0]
    assert base[1]["lr"] / 2 == pytest.approx(half[1]["lr"])
    assert load_training_state(tmp_path / "b" / "last.ckpt")["config"]["lr"] == 5e-4


# --- one-line errors -----------------------------------------------------------------------

def _cli_train(data, run_dir, *extra):
    return ["train", "--data", str(data), "--model", "vit_tiny_patch16_224", "--output",
            str(run_dir), "--epochs", "1", "--img-size", "16", "--batch-size", "4", "--workers",
            "0", "--model-arg", "patch_size=8", "--model-arg", "depth=1", "--model-arg",
            "embed_dim=32", "--model-arg", "num_heads=2", "--quiet", *extra]


@pytest.mark.parametrize("error, message", [
    (FloatingPointError("loss became nan in epoch 1; lower --lr"), "--resume"),
    (MemoryError(), "out of memory; lower --batch-size"),
    (PermissionError(13, "Permission denied", "/data/x.png"), "/data/x.png: permission denied"),
])
def test_training_failures_end_in_one_line_and_status_2(tmp_path, data, monkeypatch, capsys,
                                                       error, message):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "train_one_epoch", fail)
    assert main(_cli_train(data, tmp_path / "run")) == 2
    assert message in _one_error_line(capsys)


def test_a_file_changed_since_the_scan_ends_in_one_line(tmp_path, monkeypatch, capsys):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    real_scan = loop._scan

    def scan_then_lose_a_file(*args):
        split = real_scan(*args)
        split.train[0][0].write_bytes(b"truncated")
        return split

    monkeypatch.setattr(loop, "_scan", scan_then_lose_a_file)
    assert main(_cli_train(data, tmp_path / "run", "--workers", "1")) == 2
    err = _one_error_line(capsys)
    assert "changed since the scan" in err and "--resume" in err


def test_a_checkpoint_that_does_not_fit_the_model_ends_in_one_line(finished_run, capsys):
    path = finished_run.run_dir / "last.ckpt"
    state = load_training_state(path)
    state["model"].pop("head.bias")
    save_training_state({k: v for k, v in state.items() if k != "format"}, path)
    assert main(["train", "--resume", str(finished_run.run_dir)]) == 2
    assert "do not fit vit_tiny_patch16_224" in _one_error_line(capsys)


def test_a_weights_file_that_does_not_fit_its_model_ends_in_one_line(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="a")
    with safe_open(str(ckpt), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "head.bias"}
    save_file(tensors, str(ckpt), metadata=metadata)
    photos = tmp_path / "photos"
    _photos(photos, 1)
    assert main(["predict", str(ckpt), str(photos)]) == 2
    line = _one_error_line(capsys)
    assert "head.bias" in line and "m.safetensors" in line


def test_the_process_group_waits_long_enough_for_a_long_scan(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: seen.update(kw))
    init_distributed("cpu")
    assert seen["timeout"] == TIMEOUT and TIMEOUT.total_seconds() >= 6 * 3600


def test_run_files_are_json_and_yaml_written_whole(finished_run):
    run_dir = finished_run.run_dir
    assert json.loads((run_dir / "class_indices.json").read_text()) == {
        "0": "blue", "1": "green", "2": "red"}
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_new_file_is_written_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    from vistra.fileio import atomic_write_bytes

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"new", replace=False)
    assert target.read_bytes() == b"new"
    with pytest.raises(FileExistsError, match="out.bin"):
        atomic_write_bytes(target, b"other", replace=False)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left
