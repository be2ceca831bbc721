"""What a run leaves to read: metrics.jsonl, TensorBoard scalars and a training-curves PNG."""

from __future__ import annotations

import json
from pathlib import Path

from vistra.analysis.plots import plot_training_curves

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (an empty list if it has none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Appends one record per epoch to metrics.jsonl and TensorBoard; draws the curves PNG
    when closed (at the end or on an interruption: drawing takes about a second, too much
    to repeat every epoch of a quick run; TensorBoard shows the live curves). Only rank 0
    makes one.

    `history` is the run so far (on resume: the epochs the checkpoint holds; records of
    epochs after it, written before an interruption, are dropped and redone).
    """

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

        self.run_dir = run_dir
        self.history = list(history)
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=len(history) + 1)

    def log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["epoch"]
        for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"),
                         ("train_acc", "accuracy/train"), ("val_top1", "accuracy/val_top1"),
                         ("val_top5", "accuracy/val_top5"),
                         ("ema_val_top1", "accuracy/ema_val_top1"), ("lr", "lr")):
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.history:
            plot_training_curves(self.history, self.run_dir / CURVES_FILE)
