"""A training run's state: what it trains, where it stands, and its checkpoint form.

`RunState.state_dict()` is what last.ckpt holds (vistra.train.checkpoint writes it) and
`load_state_dict` restores it, so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from vistra.data import DatasetSplit, MixupCutmix

from .checkpoint import LAST
from .config import TrainConfig
from .data import EpochSeededSampler
from .distributed import DistContext
from .ema import ModelEma
from .logger import RunLogger
from .loss import Objective
from .optim import schedule_length, set_peak_lr


@dataclass(frozen=True)
class Best:
    """The best validation top-1 so far, its epoch, and which weights reached it."""

    top1: float = -1.0
    epoch: int = 0
    weights: str = "model"  # or "ema"


@dataclass(frozen=True)
class RunIdentity:
    """What a resumed run must share with the run it continues: the files each part trains
    on, the process count and the steps per epoch. Otherwise the schedule, the split and the
    time budget would silently stop matching the epochs done."""

    data_sha256: str  # of the paths (relative to the folder) and labels of each part
    train_images: int
    val_images: int
    world_size: int
    steps_per_epoch: int

    @classmethod
    def of(cls, split: DatasetSplit, root: str, world_size: int,
           steps_per_epoch: int) -> RunIdentity:
        digest = hashlib.sha256()
        for part, samples in (("train", split.train), ("val", split.val)):
            for path, label in samples:
                digest.update(f"{part}\t{os.path.relpath(path, root)}\t{label}\n".encode(
                    "utf-8", "surrogateescape"))
        return cls(digest.hexdigest(), len(split.train), len(split.val), world_size,
                   steps_per_epoch)

    def state_dict(self) -> dict:
        return {"data": {"sha256": self.data_sha256, "train": self.train_images,
                         "val": self.val_images},
                "world_size": self.world_size, "steps_per_epoch": self.steps_per_epoch}

    @classmethod
    def from_state_dict(cls, state: dict) -> RunIdentity:
        data = state["data"]
        return cls(data["sha256"], data["train"], data["val"], state["world_size"],
                   state["steps_per_epoch"])

    def check_continues(self, was: RunIdentity, data: str, run_dir: Path) -> None:
        """Refuse to resume `was` (the run in `run_dir` on the folder `data`) as this run."""
        if was.data_sha256 != self.data_sha256:
            raise ValueError(
                f"{data}: the images have changed since the run in {run_dir} started "
                f"(train {was.train_images} -> {self.train_images}, val {was.val_images} -> "
                f"{self.val_images} files, or files renamed or moved between classes); resume "
                "needs the same files: restore them, or start a new run")
        if was.world_size != self.world_size:
            raise ValueError(f"the run in {run_dir} was trained by {was.world_size} "
                             f"process(es), this resume has {self.world_size}; resume it with "
                             "the same torchrun process count")
        if was.steps_per_epoch != self.steps_per_epoch:
            raise ValueError(f"an epoch of the run in {run_dir} had {was.steps_per_epoch} "
                             f"steps, now it would have {self.steps_per_epoch}; resume needs "
                             "the same data, batch size and process count")


@dataclass
class RunState:
    """Everything a run carries from one epoch to the next, on every process."""

    cfg: TrainConfig  # amp resolved: what config.yaml and the checkpoints record
    ctx: DistContext
    run_dir: Path
    split: DatasetSplit
    identity: RunIdentity
    model: nn.Module
    net: nn.Module  # the model as it trains: in DistributedDataParallel under torchrun
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: DataLoader
    sampler: EpochSeededSampler
    val_loader: DataLoader
    mixer: MixupCutmix | None
    objective: Objective = field(default_factory=Objective)  # class weights, the teacher
    # fp16's loss scale (disabled, and its state empty, for other precisions)
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    epoch: int = 0  # the epoch under way, or the last one done between epochs
    # the epoch whose state last.ckpt holds (rank 0 writes it; the others know the start)
    checkpointed: int = 0
    best: Best = field(default_factory=Best)
    history: list[dict] = field(default_factory=list)  # the metrics records of epochs done
    # seconds per epoch, the run's earlier processes' included
    epoch_times: list[float] = field(default_factory=list)
    logger: RunLogger | None = None  # rank 0's

    @property
    def planned(self) -> int:
        """The epochs the schedule ends with: cfg.epochs, or what fits the time budget."""
        return schedule_length(self.scheduler) // self.identity.steps_per_epoch

    @property
    def out_of_patience(self) -> bool:
        """cfg.patience epochs have passed without a better validation top-1."""
        patience = self.cfg.patience
        return patience is not None and self.epoch - self.best.epoch >= patience

    def state_dict(self) -> dict:
        """The run as last.ckpt holds it (the keys of vistra.train.checkpoint.KEYS)."""
        return {"epoch": self.epoch, "best_top1": self.best.top1,
                "best_epoch": self.best.epoch, "best_weights": self.best.weights,
                "classes": self.split.classes, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict(),
                "history": self.history, "run": self.identity.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a last.ckpt of this run), with this run's --lr."""
        self.identity.check_continues(RunIdentity.from_state_dict(state["run"]),
                                      self.cfg.data, self.run_dir)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except RuntimeError as err:
            raise ValueError(f"{self.run_dir / LAST}: its weights do not fit {self.cfg.model} "
                             f"as this version of vistra builds it ({_one_line(err)}); resume "
                             "it with the version that wrote it") from err
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # absent from checkpoints written before fp16 (none ran it)
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_peak_lr(self.scheduler, self.cfg.lr)  # a resume may give a new --lr
        self.best = Best(state["best_top1"], state["best_epoch"], state["best_weights"])
        self.epoch = self.checkpointed = state["epoch"]
        self.history = list(state["history"])
        self.epoch_times = [record["seconds"] for record in self.history]


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
