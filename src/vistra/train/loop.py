"""The training loop: `train(cfg)` for a new run, `resume(run_dir)` to continue one.

One process or many under torchrun, same code: each process trains on its shard of every
epoch, DDP averages the gradients, the epoch's sums are added up over processes, and only
rank 0 prints and writes files. Every epoch ends with last.ckpt (resumable), a metrics line,
and best.safetensors when validation top-1 improved.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vistra.data import (
    DatasetSplit,
    MixupCutmix,
    format_class_counts,
    plot_class_counts,
    scan_image_folder,
    write_class_indices,
)
from vistra.evaluate import EvalTotals, mean_logits, run_evaluation
from vistra.factory import create_model
from vistra.weights import save_checkpoint

from .budget import replan, warmup_end
from .checkpoint import load_training_state, save_training_state
from .config import TrainConfig, config_from_dict
from .data import build_loaders, draw_seed
from .distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_from_main,
    close_distributed,
    init_distributed,
)
from .ema import ModelEma
from .logger import RunLogger, read_metrics
from .optim import build_optimizer, build_scheduler, schedule_length, set_schedule_length
from .params import freeze_all_but_head

LAST = "last.ckpt"
BEST = "best.safetensors"


@dataclass
class TrainResult:
    run_dir: Path
    best_top1: float
    best_epoch: int
    best_weights: str  # "model" or "ema": which weights best.safetensors holds
    history: list[dict]  # the metrics.jsonl records (rank 0; empty on other ranks)
    split: DatasetSplit  # the classes and the train / validation images used
    model: nn.Module  # the weights after the last epoch (not necessarily the best)


def train(cfg: TrainConfig) -> TrainResult:
    """Train `cfg.model` on the image folder `cfg.data`; see TrainConfig for every option."""
    cfg.require_inputs()
    ctx = init_distributed(cfg.device)
    try:
        run_dir = broadcast_from_main(_new_run_dir(cfg) if ctx.is_main else None, ctx)
        return _fit(cfg, ctx, run_dir, state=None)
    finally:
        close_distributed(ctx)


def resume(run_dir: str | Path, device: str | None = None) -> TrainResult:
    """Continue an interrupted run from its last.ckpt, with its saved configuration.

    The result is the same as if the run had never stopped: every random draw depends only
    on the seed, the epoch and the image, and the optimizer, schedule and EMA are restored.
    """
    run_dir = Path(run_dir)
    ctx = init_distributed(device)
    try:
        state = broadcast_from_main(load_training_state(run_dir / LAST) if ctx.is_main
                                    else None, ctx)
        cfg = replace(config_from_dict(state["config"], source=str(run_dir / LAST)),
                      device=device)
        return _fit(cfg, ctx, run_dir, state)
    finally:
        close_distributed(ctx)


def _new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{cfg.model}-{stamp}"
    run_dir = Path(cfg.output)
    if (run_dir / LAST).exists():
        raise ValueError(f"{run_dir} already holds a run ({LAST}); continue it with "
                         f"`vistra train --resume {run_dir}` or choose another --output")
    return run_dir


def _say(ctx: DistContext, cfg: TrainConfig, message: str) -> None:
    if ctx.is_main and not cfg.quiet:
        print(message, flush=True)


def _prepare_data(cfg: TrainConfig, ctx: DistContext, run_dir: Path) -> DatasetSplit:
    """Rank 0 scans (decoding every file once), reports and writes the class files."""
    if not ctx.is_main:
        return broadcast_from_main(None, ctx)
    # Cached images are kept from the scan, which decodes every file anyway.
    split = scan_image_folder(cfg.data, cfg.val_fraction, cfg.seed, keep_images=cfg.cache_images)
    if not split.val:
        raise ValueError(f"{cfg.data}: no validation images; set val_fraction above 0 or add "
                         "a val/ folder")
    if split.skipped:
        print(f"skipping {len(split.skipped)} unusable file(s):", file=sys.stderr)
        for path, reason in split.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The resolved options, reusable as a recipe: vistra train --config RUN/config.yaml
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_class_indices(split.classes, run_dir / "class_indices.json")
    plot_class_counts(split, run_dir / "class_counts.png")
    where = "given train/val folders" if split.split_source == "folders" else \
        f"{cfg.val_fraction:.0%} of each class held out, seed {cfg.seed}"
    _say(ctx, cfg, f"{cfg.data}: {len(split.classes)} classes ({where})\n"
                   f"{format_class_counts(split)}")
    if ctx.distributed:  # the other ranks decode their own shards: no images on the wire
        broadcast_from_main(replace(split, images={}), ctx)
    return split


def _build_model(cfg: TrainConfig, num_classes: int, pretrained: str | None) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=pretrained, num_classes=num_classes,
                         **cfg.model_overrides())
    if cfg.crop_pct is not None:
        model.data_config = replace(model.data_config, crop_pct=cfg.crop_pct)
    if cfg.freeze_layers:
        freeze_all_but_head(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _loss(output, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy; a distilled model's two heads both learn the labels (mean of losses)."""
    outputs = output if isinstance(output, tuple) else (output,)
    return sum(F.cross_entropy(o.float(), targets, label_smoothing=label_smoothing)
               for o in outputs) / len(outputs)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, cfg: TrainConfig,
                    ctx: DistContext, epoch: int, ema: ModelEma | None,
                    mixer: MixupCutmix | None, epochs: int) -> tuple[float, float]:
    """One pass over this process's shard; returns (loss, accuracy) over all processes.

    Accuracy is of the argmax against the image's own label (under mixup, the label of the
    image that dominates the blend only by chance, so it reads low).
    """
    model.train()
    torch.manual_seed(draw_seed(cfg.seed, epoch, -1 - ctx.rank))  # dropout, mixup draws
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
               disable=not ctx.is_main or cfg.quiet, dynamic_ncols=True)
    start = time.perf_counter()
    for images, targets in bar:
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        goal, smoothing = targets, cfg.label_smoothing
        if mixer is not None:  # soft targets, already smoothed
            images, goal = mixer(images, targets)
            smoothing = 0.0
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            output = model(images)
        loss = _loss(output, goal, smoothing)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; lower --lr, "
                                     "add --warmup-epochs or --clip-grad")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(_unwrap(model))
        n = targets.shape[0]
        correct = (mean_logits(output).argmax(1) == targets).sum().item()
        sums += torch.tensor([loss.item() * n, correct, n], dtype=torch.float64)
        seconds = time.perf_counter() - start
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.1%}",
                        img_s=f"{sums[2] * ctx.world_size / seconds:.0f}", refresh=False)
    sums = all_reduce_sum(sums, ctx)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _validate(model: nn.Module, loader, num_classes: int, cfg: TrainConfig,
              ctx: DistContext) -> EvalTotals:
    local = run_evaluation(model, loader, num_classes, ctx.device, cfg.bf16)
    return EvalTotals.from_tensor(all_reduce_sum(local.as_tensor(), ctx), num_classes)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _fit(cfg: TrainConfig, ctx: DistContext, run_dir: Path, state: dict | None) -> TrainResult:
    clock = time.perf_counter()  # the time budget's start (earlier processes' epochs added)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = _prepare_data(cfg, ctx, run_dir)
    if state is not None and state["classes"] != split.classes:
        raise ValueError(f"{cfg.data} now has classes {split.classes}, the run in {run_dir} "
                         f"was trained on {state['classes']}; resume needs the same folders")
    num_classes = len(split.classes)
    model = _build_model(cfg, num_classes, cfg.weights if state is None else None)
    # Convolution weights in channels-last: oneDNN runs convolutions NHWC natively and would
    # otherwise reorder every activation and gradient; conv-stem models step 6-9% faster.
    model.to(ctx.device, memory_format=torch.channels_last)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
    train_loader, sampler, val_loader = build_loaders(split, model, cfg, ctx)
    split.images.clear()  # the loaders' caches hold them now, in the model's mode
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    best = {"best_top1": -1.0, "best_epoch": 0, "best_weights": "model"}
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        best = {key: state[key] for key in best}
        start_epoch = state["epoch"]
    net = model
    if ctx.distributed:
        net = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    mixer = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = MixupCutmix(num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob,
                            cfg.mix_switch_prob, cfg.label_smoothing)
    extra = {"split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                       "source": split.split_source}, "train_config": cfg.to_dict()}

    def training_state(epoch: int) -> dict:
        return {"epoch": epoch, **best, "classes": split.classes, "config": cfg.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}

    logger = None
    epoch_times: list[float] = []  # seconds per epoch, the run's earlier processes' included
    if ctx.is_main:
        history = [r for r in read_metrics(run_dir) if r["epoch"] <= start_epoch]
        epoch_times = [r["seconds"] for r in history]
        clock -= sum(epoch_times)
        logger = RunLogger(run_dir, history)
        if state is None:  # so that even an interruption in epoch 1 can be resumed
            save_training_state(training_state(0), run_dir / LAST)
        _say(ctx, cfg, f"run directory: {run_dir}")
    epoch = completed = start_epoch
    # the epochs the schedule ends with: cfg.epochs, or what fits the time budget
    planned = schedule_length(scheduler) // len(train_loader)
    try:
        while epoch < planned:
            epoch += 1
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            train_loss, train_acc = train_one_epoch(net, train_loader, optimizer, scheduler,
                                                    cfg, ctx, epoch, ema, mixer, planned)
            val = _validate(model, val_loader, num_classes, cfg, ctx)
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                      "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5,
                      "lr": optimizer.param_groups[0]["lr"]}
            candidates = [("model", val.top1, model)]
            if ema is not None:
                ema_val = _validate(ema.module, val_loader, num_classes, cfg, ctx)
                record["ema_val_top1"] = ema_val.top1
                candidates.append(("ema", ema_val.top1, ema.module))
            which, top1, weights = max(candidates, key=lambda c: c[1])
            improved = top1 > best["best_top1"]
            if improved:
                best = {"best_top1": top1, "best_epoch": epoch, "best_weights": which}
            record["seconds"] = round(time.perf_counter() - start, 3)
            epoch_times.append(record["seconds"])
            fitted = _fit_time_budget(cfg, ctx, epoch, epoch_times, time.perf_counter() - clock,
                                      planned)
            replanned = fitted not in (None, planned)
            if replanned:
                set_schedule_length(scheduler, fitted * len(train_loader))  # saved with it
                planned = fitted
            record["epochs"] = planned
            if ctx.is_main:
                if improved:
                    save_checkpoint(weights, run_dir / BEST, classes=split.classes,
                                    extra={**extra, "epoch": epoch, "top1": top1,
                                           "weights": which})
                save_training_state(training_state(epoch), run_dir / LAST)
                completed = epoch
                logger.log(record)
                _say(ctx, cfg, _epoch_line(record, which if improved else None))
                if replanned:
                    _say(ctx, cfg, f"time budget {cfg.time_budget:g} min: epochs take "
                                   f"{statistics.median(epoch_times):.0f} s, {planned} fit; "
                                   f"the schedule now ends with epoch {planned}")
    except KeyboardInterrupt:
        if ctx.is_main:
            print(f"\ninterrupted in epoch {epoch}; {run_dir / LAST} holds the state after "
                  f"epoch {completed}. Continue with: vistra train --resume {run_dir}",
                  file=sys.stderr)
        raise
    finally:
        if logger is not None:
            logger.close()
    history = logger.history if logger is not None else []
    _say(ctx, cfg, f"best validation top-1 {best['best_top1']:.2%} (epoch {best['best_epoch']}, "
                   f"{best['best_weights']} weights) -> {run_dir / BEST}")
    return TrainResult(run_dir, best["best_top1"], best["best_epoch"], best["best_weights"],
                       history, split, model)


def _fit_time_budget(cfg: TrainConfig, ctx: DistContext, epoch: int, epoch_times: list[float],
                     elapsed: float, planned: int) -> int | None:
    """The epochs that fit cfg.time_budget (rank 0's measurement, so all ranks agree), or
    None while the schedule does not depend on them yet."""
    if cfg.time_budget is None or epoch < warmup_end(cfg.warmup_epochs):
        return None
    return broadcast_from_main(
        replan(cfg.time_budget * 60, elapsed, epoch_times, planned, cfg.epochs), ctx)


def _epoch_line(r: dict, saved: str | None) -> str:
    ema = f" (EMA {r['ema_val_top1']:.1%})" if "ema_val_top1" in r else ""
    best = f"  -> best ({saved} weights)" if saved else ""
    return (f"epoch {r['epoch']}/{r['epochs']}  train loss {r['train_loss']:.4f} acc "
            f"{r['train_acc']:.1%}  val loss {r['val_loss']:.4f} top-1 {r['val_top1']:.1%}"
            f"{ema} top-5 {r['val_top5']:.1%}  lr {r['lr']:.2e}  {r['seconds']:.1f}s{best}")
