"""Optimizers and the learning-rate schedule: linear warmup, then cosine down to lr * lrf."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from .params import param_groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov off, as the reference ViT recipe) or AdamW; each parameter
    group at lr times its `lr_scale` (layer decay's, else 1)."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    # On CUDA the fused step: one kernel for every parameter of a group (and it reads an fp16
    # gradient scaler's state itself). Elsewhere foreach: one call per group instead of a
    # Python loop over the parameters, which makes a small model's CPU step faster too.
    kernel = {"fused": True} if _on_cuda(model) else {"foreach": True}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kernel)
    return torch.optim.AdamW(groups, lr=cfg.lr, **kernel)


def _on_cuda(model: nn.Module) -> bool:
    return all(p.device.type == "cuda" for p in model.parameters())


class WarmupCosine:
    """lr multiplier per step: (step + 1) / warmup during warmup, then a cosine from 1 to lrf.

    A class (not a closure) so LambdaLR's state_dict records its numbers.
    """

    def __init__(self, total_steps: int, warmup_steps: int, lrf: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = min(warmup_steps, total_steps)
        self.lrf = lrf

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps - 1, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.lrf + (1.0 - self.lrf) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (`steps_per_epoch` of them: with accumulation, fewer
    than batches), so short runs and warmup of a fraction of an epoch behave smoothly."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup, cfg.lrf))


def schedule_length(scheduler: torch.optim.lr_scheduler.LambdaLR) -> int:
    """The step with which the cosine ends."""
    return scheduler.lr_lambdas[0].total_steps


def set_schedule_length(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """End the cosine at `total_steps` instead (a time budget's choice), from the next step
    on: the optimizer's learning rates are set to the changed schedule's at once. The length
    is part of the scheduler's state_dict, so a resumed run keeps it."""
    scheduler.lr_lambdas[0].total_steps = total_steps
    _apply_schedule(scheduler)


def set_peak_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make the schedule's peak `lr` from the next step on (a resumed run given a new --lr,
    e.g. after a divergence); the steps done and the schedule's shape stay."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr * group.get("lr_scale", 1.0) for group in groups]
    for group, base_lr in zip(groups, scheduler.base_lrs, strict=True):
        group["initial_lr"] = base_lr
    _apply_schedule(scheduler)


def _apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates to the (changed) schedule's at its current step."""
    schedule = scheduler.lr_lambdas[0]
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
