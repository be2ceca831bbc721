"""What a run leaves to read: metrics.jsonl, TensorBoard scalars and a training-curves PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vistra.analysis.plots import plot_training_curves
from vistra.fileio import append_line, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (an empty list if it has none yet).

    A torn last line (the process was killed while appending it) is dropped with a warning;
    a bad line elsewhere means the file was edited, and is an error naming the line.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n != lines[-1][0]:
                raise ValueError(f"{path}, line {n}, is not a JSON record; restore the file "
                                 "or delete the line") from None
            print(f"warning: {path}: dropped a torn last line (the run was stopped while "
                  "writing it)", file=sys.stderr)
    return records


class RunLogger:
    """Appends one record per epoch to metrics.jsonl and TensorBoard; draws the curves PNG
    when closed (at the end or on an interruption: drawing takes about a second, too much
    to repeat every epoch of a quick run; TensorBoard shows the live curves). Only rank 0
    makes one.

    `history` is the run so far: metrics.jsonl is rewritten from it, so after a resume the
    file holds exactly the epochs the checkpoint holds (records written after it, or torn by
    a kill, are dropped and the epochs redone).
    """

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

        self.run_dir = run_dir
        atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=len(history) + 1)

    def log(self, record: dict) -> None:
        append_line(self.run_dir / METRICS_FILE, json.dumps(record))
        step = record["epoch"]
        for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"),
                         ("train_acc", "accuracy/train"), ("val_top1", "accuracy/val_top1"),
                         ("val_top5", "accuracy/val_top5"),
                         ("ema_val_top1", "accuracy/ema_val_top1"), ("lr", "lr")):
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        self.writer.flush()

    def close(self, history: list[dict]) -> None:
        self.writer.close()
        if history:
            plot_training_curves(history, self.run_dir / CURVES_FILE)
