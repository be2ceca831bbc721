"""`vistra predict`: formats on stdout, annotated copies, and an exit status that says
whether any input failed."""

import json

from PIL import Image
from test_evaluate import constant_checkpoint

from vistra.cli import main


def _images(folder, n):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (30, 20), (i * 40, 90, 10)).save(folder / f"{i}.jpg")
    return folder


def test_json_for_a_folder_and_annotated_copies(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b", "c"], favourite="c")
    folder = _images(tmp_path / "in", 3)
    out = tmp_path / "annotated"
    assert main(["predict", str(ckpt), str(folder), "--topk", "2", "--format", "json",
                 "--annotate", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in result] == [str(folder / f"{i}.jpg") for i in range(3)]
    assert all([t["class"] for t in r["topk"]] == ["c", "a"] for r in result)
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.vistra.png" for i in range(3)]


def test_failures_are_reported_and_make_the_exit_status_nonzero(tmp_path, capsys):
    ckpt = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], favourite="b")
    folder = _images(tmp_path / "in", 1)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["predict", str(ckpt), str(folder), "--format", "csv"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["path,rank,class,probability",
                                         f"{folder / '0.jpg'},1,b,1.000000",
                                         f"{folder / '0.jpg'},2,a,0.000000"]
    assert f"skipped {broken}" in captured.err
    assert main(["predict", str(ckpt), str(folder / "0.jpg")]) == 0
    assert main(["predict", str(ckpt), str(tmp_path / "missing.png")]) == 1
