"""The training loop: `train(cfg)` for a new run, `resume(run_dir)` to continue one.

One process or many under torchrun, same code: each process trains on its shard of every
epoch, DDP averages the gradients, the epoch's sums are added up over processes, and only
rank 0 prints and writes files. Every epoch ends with best.safetensors when validation
top-1 improved, last.ckpt (resumable, holding the epoch's metrics record) and then the record
appended to metrics.jsonl: a kill at any point leaves a checkpoint to resume from, and the
resumed run rewrites metrics.jsonl from it, so no epoch is missing or counted twice.

`_start_run` builds the run's state (a RunState, vistra.train.state); `_fit` is the loop over
its epochs.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vistra.accel import (
    accelerate_training,
    amp_dtype,
    describe_device,
    device_has_bf16,
    enable_tf32,
    resolve_amp,
)
from vistra.data import (
    DatasetSplit,
    MixupCutmix,
    format_class_counts,
    plot_class_counts,
    scan_image_folder,
    write_class_indices,
)
from vistra.evaluate import EvalTotals, run_evaluation
from vistra.explain.choose import choose_for_run, relative_deletion
from vistra.factory import create_model
from vistra.fileio import atomic_write_text
from vistra.runtime import is_distilled, mean_logits
from vistra.weights import save_checkpoint

from .budget import replan, warmup_end
from .checkpoint import BEST, LAST, load_training_state, locked_run_dir, save_training_state
from .config import TrainConfig, config_from_dict
from .data import build_loaders, class_weights, draw_seed
from .distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_from_main,
    init_distributed,
    on_main,
    process_group,
)
from .ema import ModelEma
from .logger import RunLogger, read_metrics
from .loss import Distillation, Objective
from .optim import build_optimizer, build_scheduler, set_schedule_length
from .params import describe_layer_decay, freeze_all_but_head
from .state import Best, RunIdentity, RunState
from .teacher import InputFormat, Teacher, TeacherIdentity, TeacherModel, load_teacher

# Options a resumed run may change: none alters what the schedule has done or will do,
# nor which images it trains on (lr scales the rest of the schedule, e.g. after a divergence;
# teacher: the same teacher from another place, its SHA-256 checked).
RESUME_OVERRIDES = ("lr", "clip_grad", "device", "workers", "threads", "cache_images", "quiet",
                    "teacher", "explain_choose", "explain_choose_images",
                    "explain_choose_seconds")


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
    with process_group(ctx), ExitStack() as held:
        # rank 0 holds the run directory's lock until this returns or the process ends
        run_dir = on_main(lambda: held.enter_context(locked_run_dir(_new_run_dir(cfg), new=True)),
                          ctx)
        return _fit(cfg, ctx, run_dir, saved=None)


def resume(run_dir: str | Path, device: str | None = None, **overrides) -> TrainResult:
    """Continue an interrupted run from its last.ckpt, with its saved configuration.

    The result is the same as if the run had never stopped: every random draw depends only
    on the seed, the epoch and the image, and the optimizer, schedule and EMA are restored.
    `overrides` may change the options in RESUME_OVERRIDES (e.g. lr=3e-4 after a divergence).
    """
    refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if refused:
        raise ValueError(f"a resumed run cannot change {', '.join(_flags(refused))}: they would "
                         f"change what it has done so far; it accepts "
                         f"{', '.join(_flags(RESUME_OVERRIDES))}")
    run_dir = Path(run_dir)
    ctx = init_distributed(device)
    with process_group(ctx), ExitStack() as held:
        def load() -> dict:
            held.enter_context(locked_run_dir(run_dir, new=False))
            return load_training_state(run_dir / LAST)

        saved = on_main(load, ctx)
        cfg = replace(config_from_dict(saved["config"], source=str(run_dir / LAST)),
                      **{**overrides, "device": device})
        if "teacher" in overrides and (cfg.teacher is None) != (cfg.teacher_sha256 is None):
            had = "without a teacher" if cfg.teacher_sha256 is None else "with a teacher"
            raise ValueError(f"the run in {run_dir} was trained {had}; resume it as it was, or "
                             f"start a new run with --config {run_dir / 'config.yaml'}")
        return _fit(cfg, ctx, run_dir, saved)


def _flags(names) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names]


def _new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{cfg.model}-{stamp}"
    return Path(cfg.output)


def _say(ctx: DistContext, cfg: TrainConfig, message: str) -> None:
    if ctx.is_main and not cfg.quiet:
        print(message, flush=True)


def _fit(cfg: TrainConfig, ctx: DistContext, run_dir: Path, saved: dict | None) -> TrainResult:
    """Train to the end of the schedule, from the start or from `saved` (the last.ckpt that
    a resumed run continues), on `cfg.threads` CPU threads if set."""
    with _intra_op_threads(cfg.threads):
        return _fit_on_threads(cfg, ctx, run_dir, saved)


@contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` (None: left as they are) for the block, and
    given back after it: a Python caller's process keeps its own count (a process that
    trained with threads=1 and then another model would otherwise train that one on one
    thread too, and with other rounding)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_on_threads(cfg: TrainConfig, ctx: DistContext, run_dir: Path, saved: dict | None
                    ) -> TrainResult:
    clock = time.perf_counter()  # the time budget's start (earlier processes' epochs added)
    run = _start_run(cfg, ctx, run_dir, saved)
    clock -= sum(run.epoch_times)
    cfg = run.cfg  # with amp resolved
    first_epoch = run.epoch + 1  # of this process: a compiled model compiles in its first step
    with _stops_explained(run):
        while run.epoch < run.planned and not run.out_of_patience:
            run.epoch += 1
            start = time.perf_counter()
            run.sampler.set_epoch(run.epoch)
            train_loss, train_acc = train_one_epoch(
                run.net, run.train_loader, run.optimizer, run.scheduler, cfg, ctx, run.epoch,
                run.ema, run.mixer, run.planned, run.objective, scaler=run.scaler,
                time_first_step=cfg.compile and run.epoch == first_epoch)
            record, (which, top1, weights) = _validate_epoch(run, train_loss, train_acc)
            improved = top1 > run.best.top1
            if improved:
                run.best = Best(top1, run.epoch, which)
            record["seconds"] = round(time.perf_counter() - start, 3)
            run.epoch_times.append(record["seconds"])
            replanned = _replan(run, time.perf_counter() - clock)
            record["epochs"] = run.planned
            run.history.append(record)  # before last.ckpt is saved: it holds the record
            if ctx.is_main:
                _save_epoch(run, record, weights if improved else None, replanned)
    best = run.best
    if run.out_of_patience and run.epoch < run.planned:
        _say(ctx, cfg, f"stopped after epoch {run.epoch} of {run.planned}: no better validation "
                       f"top-1 in {cfg.patience} epoch(s) (patience {cfg.patience})")
    _say(ctx, cfg, f"best validation top-1 {best.top1:.2%} (epoch {best.epoch}, "
                   f"{best.weights} weights) -> {run_dir / BEST}")
    if ctx.is_main and cfg.explain_choose:
        _choose_explain(run)
    return TrainResult(run_dir, best.top1, best.epoch, best.weights,
                       run.history if ctx.is_main else [], run.split, run.model)


def _start_run(cfg: TrainConfig, ctx: DistContext, run_dir: Path,
               saved: dict | None) -> RunState:
    """The run ready for its first epoch, or for the one after `saved`: data scanned, model,
    EMA, loaders, optimizer and schedule built (and restored), rank 0's run files opened."""
    cfg = choose_amp(cfg, ctx)  # before anything records cfg (config.yaml, checkpoints)
    teacher = None
    if cfg.teacher:  # every process runs its own copy on its own batches
        teacher = load_teacher(cfg.teacher, ctx.device)
        cfg = _pin_teacher(cfg, teacher.identity, run_dir, saved)
    split = _prepare_data(cfg, ctx, run_dir, teacher.identity if teacher else None)
    if saved is not None and saved["classes"] != split.classes:
        raise ValueError(f"{cfg.data} now has classes {split.classes}, the run in {run_dir} "
                         f"was trained on {saved['classes']}; resume needs the same folders")
    num_classes = len(split.classes)
    model = _build_model(cfg, num_classes, cfg.weights if saved is None else None)
    # Convolution weights in channels-last: oneDNN runs convolutions NHWC natively and would
    # otherwise reorder every activation and gradient (benchmarks/fashion_mnist_ablations.md).
    model.to(ctx.device, memory_format=torch.channels_last)
    accelerate_training(model)  # the CPU's fastest attention kernels; same weights and keys
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
    train_loader, sampler, val_loader = build_loaders(split, model, cfg, ctx)
    split.images.clear()  # the loaders' caches hold them now, in the model's mode
    optimizer = build_optimizer(model, cfg)  # fused on CUDA
    # fp16's gradients underflow unscaled; the scaler's state is saved in last.ckpt
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)  # optimizer steps
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    mixer = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = MixupCutmix(num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob,
                            cfg.mix_switch_prob, cfg.label_smoothing)
    run = RunState(cfg, ctx, run_dir, split,
                   RunIdentity.of(split, cfg.data, ctx.world_size, steps_per_epoch),
                   model=model, net=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                   train_loader=train_loader, sampler=sampler, val_loader=val_loader,
                   mixer=mixer, objective=_objective(cfg, ctx, model, split, teacher),
                   scaler=scaler)
    _describe_optimisation(run)
    if saved is not None:
        run.load_state_dict(saved)
    if cfg.compile:  # in place: the same module, parameters and state-dict keys
        model.compile()
    if ctx.distributed:
        run.net = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.is_main:
        _open_run_files(run, resumed=saved is not None)
    return run


def _pin_teacher(cfg: TrainConfig, identity: TeacherIdentity, run_dir: Path,
                 saved: dict | None) -> TrainConfig:
    """`cfg` with teacher_sha256 set to the teacher's, so config.yaml and last.ckpt record
    it; refused if it was set (by a recipe, or by the run a resume continues) to another."""
    if cfg.teacher_sha256 is None:
        return replace(cfg, teacher_sha256=identity.sha256)
    if cfg.teacher_sha256 == identity.sha256:
        return cfg
    found = f"sha256 {cfg.teacher_sha256[:12]}..., now {identity.sha256[:12]}..."
    if saved is None:
        raise ValueError(f"teacher {cfg.teacher} is not the one teacher_sha256 names ({found}); "
                         "give that teacher, or drop teacher_sha256 to accept this one")
    was = saved["config"]["teacher"]
    what = f"its teacher {was} has changed" if was == cfg.teacher else \
        f"it learnt from the teacher {was}, {cfg.teacher} is another"
    raise ValueError(f"cannot resume the run in {run_dir}: {what} ({found}); resume it with "
                     "the teacher it started with, or start a new run")


def _objective(cfg: TrainConfig, ctx: DistContext, model: nn.Module, split: DatasetSplit,
               teacher: TeacherModel | None) -> Objective:
    """The loss settings: inverse-frequency class weights (balance "loss") and the teacher
    fitted to the student's input format and the folder's classes."""
    weights = None
    if cfg.balance == "loss":
        labels = [label for _, label in split.train]
        weights = class_weights(labels, len(split.classes)).to(ctx.device)
    if teacher is None:
        return Objective(weights)
    student = InputFormat.of(model.data_config, model.arch.in_chans)
    distilled = is_distilled(model)
    kind = cfg.distill or ("hard" if distilled else "soft")
    distillation = Distillation(kind, cfg.distill_alpha, cfg.distill_tau)
    fitted = Teacher.fit(teacher, student, split.classes)
    who = teacher.identity
    learns = "its top class" if kind == "hard" else \
        f"its probabilities at tau {cfg.distill_tau:g}"
    _say(ctx, cfg, f"teacher: {who.model} from {who.file} (sha256 {who.sha256[:12]}..., "
                   f"{teacher.dtype}, {teacher.input_format}); the student's "
                   f"{'distillation head' if distilled else 'loss'} learns {learns}, "
                   f"alpha {cfg.distill_alpha:g}")
    return Objective(weights, fitted, distillation)


def _describe_optimisation(run: RunState) -> None:
    """Say, once, the layer-decay groups and the images each optimizer step learns from."""
    cfg, ctx = run.cfg, run.ctx
    if cfg.layer_decay is not None:
        _say(ctx, cfg, describe_layer_decay(run.optimizer.param_groups, cfg.layer_decay))
    if cfg.accum_steps > 1 or ctx.world_size > 1:
        processes = f" x {ctx.world_size} processes" if ctx.world_size > 1 else ""
        _say(ctx, cfg, f"effective batch: {cfg.batch_size} images x {cfg.accum_steps} "
                       f"accumulation step(s){processes} = "
                       f"{cfg.batch_size * cfg.accum_steps * ctx.world_size} per optimizer step")


def _open_run_files(run: RunState, resumed: bool) -> None:
    """Rank 0's logger, which rewrites metrics.jsonl from the checkpoint's records, and a new
    run's epoch-0 last.ckpt, so that even an interruption in epoch 1 can be resumed."""
    if resumed and read_metrics(run.run_dir) != run.history:
        _say(run.ctx, run.cfg, f"{run.run_dir / 'metrics.jsonl'}: rewritten from {LAST} "
                               f"(epochs 1-{run.epoch}); later records were of epochs to be "
                               "redone")
    run.logger = RunLogger(run.run_dir, run.history)
    if not resumed:
        save_training_state(run.state_dict(), run.run_dir / LAST)
    _say(run.ctx, run.cfg, f"run directory: {run.run_dir}")


def choose_amp(cfg: TrainConfig, ctx: DistContext) -> TrainConfig:
    """`cfg` with amp auto decided for this run's device (vistra.accel.resolve_amp: bf16
    where native, fp16 on older GPUs, else off), rank 0's decision on every rank; bf16, fp16
    and off pass through, so a resumed run keeps the choice its checkpoint recorded. Says
    once which device trains and, on a GPU with TF32, that fp32 matrix products use it."""
    if enable_tf32(ctx.device):
        _say(ctx, cfg, f"device: {describe_device(ctx.device)}; TF32 on for fp32 matrix "
                       "products")
    else:
        _say(ctx, cfg, f"device: {describe_device(ctx.device)}")
    if cfg.amp != "auto":
        return cfg
    amp = broadcast_from_main(resolve_amp("auto", ctx.device), ctx)
    native = device_has_bf16(ctx.device)
    if ctx.device.type == "cuda":
        why = "the GPU computes bf16 natively" if native else \
            "the GPU has no native bf16: fp16 with a gradient scaler"
    else:
        why = f"this CPU {'has' if native else 'has no'} bf16 arithmetic"
    _say(ctx, cfg, f"amp: {amp} (auto: {why})")
    return replace(cfg, amp=amp)


def _prepare_data(cfg: TrainConfig, ctx: DistContext, run_dir: Path,
                  teacher: TeacherIdentity | None) -> DatasetSplit:
    """Rank 0 scans (decoding every file once), reports and writes the class files; the
    other ranks get the split without the images (they decode their own shards)."""
    return on_main(lambda: _scan(cfg, ctx, run_dir, teacher), ctx,
                   send=lambda s: replace(s, images={}))


def _scan(cfg: TrainConfig, ctx: DistContext, run_dir: Path,
          teacher: TeacherIdentity | None) -> DatasetSplit:
    # Cached images are kept from the scan, which decodes every file anyway.
    split = scan_image_folder(cfg.data, cfg.val_fraction, cfg.seed, keep_images=cfg.cache_images)
    if not split.val:
        raise ValueError(f"{cfg.data}: no validation images; set val_fraction above 0 or add "
                         "a val/ folder")
    if split.skipped:
        print(f"skipping {len(split.skipped)} unusable file(s):", file=sys.stderr)
        for path, reason in split.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    # The resolved options, reusable as a recipe: vistra train --config RUN/config.yaml
    header = "" if teacher is None else \
        f"# teacher: {teacher.model} from {teacher.file}, sha256 {teacher.sha256}\n"
    atomic_write_text(run_dir / "config.yaml",
                      header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_class_indices(split.classes, run_dir / "class_indices.json")
    plot_class_counts(split, run_dir / "class_counts.png")
    where = "given train/val folders" if split.split_source == "folders" else \
        f"{cfg.val_fraction:.0%} of each class held out, seed {cfg.seed}"
    _say(ctx, cfg, f"{cfg.data}: {len(split.classes)} classes ({where})\n"
                   f"{format_class_counts(split)}")
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


def _loss(output, goal: torch.Tensor, smoothing: float, teacher_logits: torch.Tensor | None,
          objective: Objective) -> torch.Tensor:
    """The batch's loss (vistra.train.loss): the labels', and the teacher's if there is one."""
    return objective.loss(output, goal, teacher_logits, smoothing)


def _steps(batches: Iterable, accum_steps: int) -> Iterator[list]:
    """The batches grouped by optimizer step: `accum_steps` at a time, the epoch's last
    group what remains."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, cfg: TrainConfig,
                    ctx: DistContext, epoch: int, ema: ModelEma | None,
                    mixer: MixupCutmix | None, epochs: int,
                    objective: Objective | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    time_first_step: bool = False) -> tuple[float, float]:
    """One pass over this process's shard; returns (loss, accuracy) over all processes.

    Each optimizer step follows cfg.accum_steps batches, each batch's loss weighed by its
    share of the step's images: the gradient of the mean loss over them all, as one batch
    of them would give. Accuracy is of the argmax against the image's own label (under
    mixup, the label of the image that dominates the blend only by chance, so it reads low).
    The forward runs under cfg.amp's autocast (resolved: bf16, fp16 or off); with fp16,
    `scaler` scales the loss and skips a step whose gradients overflowed. The sums stay on
    the device, read once per step. `time_first_step`: say what the first step took (a
    compiled model compiles in it) and leave it out of the images/s.
    """
    objective = objective or Objective()
    scaler = scaler or torch.amp.GradScaler(ctx.device.type, enabled=False)
    autocast = amp_dtype(cfg.amp)
    model.train()
    torch.manual_seed(draw_seed(cfg.seed, epoch, -1 - ctx.rank))  # dropout, mixup draws
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss * n, correct, n
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
               disable=not ctx.is_main or cfg.quiet, dynamic_ncols=True)
    start, untimed = time.perf_counter(), 0.0  # images left out of the images/s
    for step, group in enumerate(_steps(bar, cfg.accum_steps)):
        step_images = sum(targets.shape[0] for _, targets in group)
        optimizer.zero_grad(set_to_none=True)
        for i, (images, targets) in enumerate(group):
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            goal, smoothing = targets, cfg.label_smoothing
            if mixer is not None:  # soft targets, already smoothed
                images, goal = mixer(images, targets)
                smoothing = 0.0
            teacher = objective.teacher
            teacher_logits = teacher(images) if teacher is not None else None
            # DDP averages the gradients over processes at the step's last batch only.
            last = i == len(group) - 1
            with nullcontext() if last or not isinstance(model, DistributedDataParallel) \
                    else model.no_sync():
                with torch.autocast(ctx.device.type, dtype=autocast,
                                    enabled=autocast is not None):
                    output = model(images)
                loss = _loss(output, goal, smoothing, teacher_logits, objective)
                scaler.scale(loss * (targets.shape[0] / step_images)).backward()
            n = targets.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += (mean_logits(output).argmax(1) == targets).sum()
            sums[2] += n
        if cfg.clip_grad:
            scaler.unscale_(optimizer)  # the norm of the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)  # skipped if fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(_unwrap(model))
        loss_sum, correct, count = sums.tolist()  # the step's one wait for the device
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss became {loss_sum} in epoch {epoch}; "
                                     "lower --lr, add --warmup-epochs or --clip-grad")
        if step == 0 and time_first_step:
            _say(ctx, cfg, f"torch.compile: the first step took "
                           f"{time.perf_counter() - start:.1f} s (compiling); images/s "
                           "from the second step on")
            start, untimed = time.perf_counter(), count
        seconds = time.perf_counter() - start
        if count > untimed and seconds > 0:
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.1%}",
                            img_s=f"{(count - untimed) * ctx.world_size / seconds:.0f}",
                            refresh=False)
    sums = all_reduce_sum(sums, ctx)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _validate(model: nn.Module, loader, num_classes: int, cfg: TrainConfig,
              ctx: DistContext) -> EvalTotals:
    local = run_evaluation(model, loader, num_classes, ctx.device, amp_dtype(cfg.amp))
    return EvalTotals.from_tensor(all_reduce_sum(local.as_tensor(), ctx), num_classes)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _validate_epoch(run: RunState, train_loss: float,
                    train_acc: float) -> tuple[dict, tuple[str, float, nn.Module]]:
    """The epoch's metrics record (its time and plan still to add) and the weights that
    validate best: (name, top-1, module), the model's unless their EMA's are better."""
    num_classes = len(run.split.classes)
    val = _validate(run.model, run.val_loader, num_classes, run.cfg, run.ctx)
    record = {"epoch": run.epoch, "train_loss": train_loss, "train_acc": train_acc,
              "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5,
              "lr": max(group["lr"] for group in run.optimizer.param_groups)}
    candidates = [("model", val.top1, run.model)]
    if run.ema is not None:
        ema_val = _validate(run.ema.module, run.val_loader, num_classes, run.cfg, run.ctx)
        record["ema_val_top1"] = ema_val.top1
        candidates.append(("ema", ema_val.top1, run.ema.module))
    return record, max(candidates, key=lambda c: c[1])


def _replan(run: RunState, elapsed: float) -> bool:
    """End the schedule with the epochs that fit cfg.time_budget (rank 0's measurement, so
    all ranks agree) once the schedule depends on them; True if that changed the plan."""
    cfg = run.cfg
    if cfg.time_budget is None or run.epoch < warmup_end(cfg.warmup_epochs):
        return False
    fitted = broadcast_from_main(
        replan(cfg.time_budget * 60, elapsed, run.epoch_times, run.planned, cfg.epochs), run.ctx)
    if fitted == run.planned:
        return False
    set_schedule_length(run.scheduler, fitted * run.identity.steps_per_epoch)  # saved with it
    return True


def _save_epoch(run: RunState, record: dict, improved: nn.Module | None,
                replanned: bool) -> None:
    """Rank 0's end of an epoch: best.safetensors from `improved` (the weights that beat the
    best so far, if any), last.ckpt (holding the record), then the record's line in
    metrics.jsonl and on the screen."""
    cfg, best = run.cfg, run.best
    if improved is not None:
        save_checkpoint(improved, run.run_dir / BEST, classes=run.split.classes,
                        extra={"split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                                         "source": run.split.split_source},
                               "train_config": cfg.to_dict(), "epoch": best.epoch,
                               "top1": best.top1, "weights": best.weights,
                               **_teacher_record(run.objective)})
    save_training_state(run.state_dict(), run.run_dir / LAST)
    run.checkpointed = run.epoch
    run.logger.log(record)
    _say(run.ctx, cfg, _epoch_line(record, best.weights if improved is not None else None))
    if replanned:
        _say(run.ctx, cfg, f"time budget {cfg.time_budget:g} min: epochs take "
                           f"{statistics.median(run.epoch_times):.0f} s, {run.planned} fit; "
                           f"the schedule now ends with epoch {run.planned}")


def _choose_explain(run: RunState) -> None:
    """Rank 0's last step: the explain method measured most faithful for the best weights on
    validation images, within cfg.explain_choose_seconds, recorded in best.safetensors
    (vistra.explain.choose). The run's weights are saved already, so a failure here is
    reported, not raised."""
    cfg, best = run.cfg, run.run_dir / BEST
    began = time.perf_counter()
    try:
        choice = choose_for_run(best, run.split.val, f"{cfg.data} (validation)",
                                limit=cfg.explain_choose_images,
                                seconds=cfg.explain_choose_seconds, device=run.ctx.device)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"explain: no method recorded in {best} ({err}); choose one later with "
              f"`vistra explain {best} --choose --data DIR --save FILE`", file=sys.stderr)
        return
    _say(run.ctx, cfg, f"explain: {choice.method}, the most faithful of "
                       f"{len(choice.scores) - 1} methods on {choice.images} validation images "
                       f"(deletion AUCs {relative_deletion(choice.scores, choice.method):.2f}x "
                       f"the random order's; {time.perf_counter() - began:.0f} s) -> recorded "
                       f"in {best}")


def _teacher_record(objective: Objective) -> dict:
    """The teacher's identity and settings for best.safetensors' metadata (none without)."""
    if objective.teacher is None:
        return {}
    settings = objective.distillation
    return {"teacher": {**objective.teacher.model.identity.to_dict(), "distill": settings.kind,
                        "alpha": settings.alpha, "tau": settings.tau}}


@contextmanager
def _stops_explained(run: RunState) -> Iterator[None]:
    """An interruption or a failure in the epochs says how to continue; rank 0's logger is
    closed (drawing the curves) however they end."""
    try:
        yield
    except KeyboardInterrupt:
        if run.ctx.is_main:
            print(f"\ninterrupted in epoch {run.epoch}; {run.run_dir / LAST} holds the state "
                  f"after epoch {run.checkpointed}. Continue with: vistra train --resume "
                  f"{run.run_dir}", file=sys.stderr)
        raise
    except FloatingPointError as err:
        raise FloatingPointError(f"{err} (or continue from epoch {run.checkpointed} with "
                                 f"`vistra train --resume {run.run_dir} --lr SMALLER`)") from err
    except RuntimeError as err:
        unreadable = _data_error(err, run.run_dir)
        if unreadable is None:
            raise
        raise unreadable from err
    finally:
        if run.logger is not None:
            run.logger.close(run.history)


def _data_error(err: RuntimeError, run_dir: Path) -> ValueError | None:
    """An image that can no longer be read (changed or removed since the scan) as a one-line
    error; a loader worker's error comes with its traceback in the text, the last line."""
    found = re.search(r"failed to load (.+)$", str(err).strip(), re.MULTILINE)
    if found is None:
        return None
    return ValueError(f"{found.group(1)} (it changed since the scan); restore the file (a "
                      f"resume needs the same files), then `vistra train --resume {run_dir}`")


def _epoch_line(r: dict, saved: str | None) -> str:
    ema = f" (EMA {r['ema_val_top1']:.1%})" if "ema_val_top1" in r else ""
    best = f"  -> best ({saved} weights)" if saved else ""
    return (f"epoch {r['epoch']}/{r['epochs']}  train loss {r['train_loss']:.4f} acc "
            f"{r['train_acc']:.1%}  val loss {r['val_loss']:.4f} top-1 {r['val_top1']:.1%}"
            f"{ema} top-5 {r['val_top5']:.1%}  lr {r['lr']:.2e}  {r['seconds']:.1f}s{best}")
