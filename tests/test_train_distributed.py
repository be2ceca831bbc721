"""Training under torchrun: two CPU processes (gloo) train as one, and rank 0 alone writes."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train_e2e import make_colour_folder

from vistra.evaluate import evaluate_checkpoint

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from vistra.train import TrainConfig, train
    data, out, weights = sys.argv[1:4]
    result = train(TrainConfig(
        data=data, model="vit_tiny_patch16_224", output=out, img_size=16, epochs=1,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        batch_size=4, lr=1e-3, workers=0, quiet=True, drop_path=0.1))
    torch.save(result.model.state_dict(), f"{weights}{os.environ['RANK']}.pt")
""")


def test_torchrun_with_two_cpu_processes_trains_one_model(tmp_path):
    data = make_colour_folder(tmp_path / "data", per_class=8)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_dir, weights = tmp_path / "run", tmp_path / "weights_rank"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(data), str(run_dir), str(weights)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rank0 = torch.load(f"{weights}0.pt", weights_only=True)
    rank1 = torch.load(f"{weights}1.pt", weights_only=True)
    assert all(torch.equal(v, rank1[k]) for k, v in rank0.items())
    saved = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in rank0.items())

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1]
    # Validation was sharded over the ranks; the logged metrics are of all the images.
    report, _ = evaluate_checkpoint(run_dir / "best.safetensors", data, holdout=True)
    assert records[0]["val_top1"] == report.totals.top1
    assert records[0]["val_loss"] == pytest.approx(report.totals.loss, rel=1e-5)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "best.safetensors", "class_counts.png", "class_indices.json", "config.yaml",
        "last.ckpt", "metrics.jsonl", "tensorboard", "training_curves.png"]


FAILING_RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    from vistra.train import TrainConfig, train
    data, out, errors = sys.argv[1:4]
    try:
        train(TrainConfig(
            data=data, model="vit_tiny_patch16_224", output=out, img_size=16, epochs=1,
            model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
            batch_size=4, workers=0, quiet=True))
    except Exception as err:
        with open(f"{errors}{os.environ['RANK']}.txt", "w") as f:
            f.write(f"{type(err).__name__}: {err}")
        raise
""")


@pytest.mark.slow
def test_an_error_on_rank_0_ends_every_rank_at_once_with_its_message(tmp_path):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")  # a run's: rank 0 refuses the directory
    script = tmp_path / "rank.py"
    script.write_text(FAILING_RANK_SCRIPT)
    errors = tmp_path / "error_rank"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(data), str(run_dir), str(errors)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    rank0 = (tmp_path / "error_rank0.txt").read_text()
    rank1 = (tmp_path / "error_rank1.txt").read_text()
    assert rank0.startswith("ValueError") and "already holds a run" in rank0
    assert rank1.startswith("PeerError: rank 0 failed") and "already holds a run" in rank1
