"""TrainConfig: every training option in one typed place.

The same dataclass is filled from Python (`TrainConfig(data=..., model=...)`), from a YAML
recipe (`load_config`) and from the command line (whose options are generated from these
fields), so a recipe, a script and a shell command mean exactly the same run.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vistra.accel.capabilities import AMP_MODES

OPTIMIZERS = ("adamw", "sgd")
DISTILL_KINDS = ("hard", "soft")
BALANCE_MODES = ("sampler", "loss")
# The bf16 key of recipes and checkpoints written before amp, and the amp it means.
BF16_AS_AMP = {True: "bf16", False: "off", "auto": "auto"}


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A field whose help text the command line shows, next to the option it generates."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on what ---
    data: str | None = _opt(None, "image folder: <class>/<images> or train/ + val/ (or test/)",
                            metavar="DIR")
    model: str | None = _opt(None, "registered model name, e.g. vit_base_patch16_224 "
                                   "(see `vistra models`)", metavar="NAME")
    weights: str | None = _opt(None, "checkpoint file to start from (timm, official Swin, "
                                     "Google .npz, torchvision, HuggingFace or vistra), or "
                                     "a name in the local HuggingFace cache: a timm tag of "
                                     "the model, hf-hub:ORG/NAME or ORG/NAME",
                               metavar="FILE")
    output: str | None = _opt(None, "run directory (default: runs/<model>-<date>-<time>)",
                              metavar="RUN_DIR")
    img_size: int | None = _opt(None, "input size in pixels (default: the model's)")
    in_chans: int | None = _opt(None, "3 for RGB (default) or 1 to feed the images' luminance")
    drop_path: float | None = _opt(None, "stochastic depth rate (default: the model's, 0)")
    model_kwargs: dict[str, Any] = _opt({}, "other model options (fields of the model's "
                                            "ViTConfig / SwinConfig), e.g. {patch_size: 4, "
                                            "depth: 6}; on the command line --model-arg "
                                            "KEY=VALUE, repeatable")
    crop_pct: float | None = _opt(None, "evaluation centre-crop fraction (default: the model's)")
    # --- data ---
    val_fraction: float = _opt(0.2, "share of each class held out for validation when the "
                                    "folder has no val/ or test/ part")
    batch_size: int = _opt(32, "images per step on each process (under torchrun the global "
                               "batch is this times the number of processes)")
    workers: int = _opt(2, "data-loading worker processes per training process (0: none)")
    cache_images: bool = _opt(False, "keep decoded images in memory after their first use "
                                     "(each loader worker its own copy): for datasets that "
                                     "fit in RAM, such as Fashion-MNIST")
    scale: tuple[float, float] = _opt((0.08, 1.0), "RandomResizedCrop area range", nargs=2)
    hflip: float = _opt(0.5, "probability of a horizontal flip")
    randaugment_ops: int = _opt(0, "RandAugment ops per image (0: off; 2 is usual)")
    randaugment_magnitude: float = _opt(9.0, "RandAugment magnitude, 0-10")
    random_erasing: float = _opt(0.0, "probability of replacing a random box of each training "
                                      "image by noise (0: off; 0.25 is usual)")
    mixup: float = _opt(0.0, "mixup alpha (0: off; 0.8 is usual)")
    cutmix: float = _opt(0.0, "cutmix alpha (0: off; 1.0 is usual)")
    mix_prob: float = _opt(1.0, "probability that a batch is mixed when mixup/cutmix is on")
    mix_switch_prob: float = _opt(0.5, "probability of cutmix rather than mixup when both on")
    label_smoothing: float = _opt(0.0, "label smoothing (0.1 is usual)")
    # --- optimisation ---
    epochs: int = _opt(10, "training epochs (with time_budget: the most)")
    time_budget: float | None = _opt(None, "minutes of training: as many epochs as fit, up to "
                                           "`epochs`, the schedule ending with the last "
                                           "(chosen after warmup from measured epoch times)",
                                     metavar="MIN")
    optimizer: str = _opt("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = _opt(1e-4, "peak learning rate (not scaled with batch size or processes)")
    lrf: float = _opt(0.01, "final learning rate as a fraction of lr (cosine schedule)")
    warmup_epochs: float = _opt(0.0, "epochs of linear warmup from 0 to lr")
    weight_decay: float = _opt(0.05, "weight decay (never on norms, biases, tokens, position "
                                     "embeddings or relative position bias tables)")
    momentum: float = _opt(0.9, "SGD momentum")
    clip_grad: float | None = _opt(None, "clip the gradient norm to this value (default: off)")
    freeze_layers: bool = _opt(False, "train only the head (and pre-logits), freeze the rest")
    ema: bool = _opt(False, "keep an exponential moving average of the weights")
    ema_decay: float = _opt(0.999, "EMA decay per step")
    amp: str = _opt("off", "mixed precision: the forward pass under bf16 or fp16 autocast "
                           "(fp16 with a gradient scaler), or off (fp32; TF32 matrix products "
                           "on GPUs that have it); auto: bf16 where the device computes it "
                           "natively (a CUDA GPU of compute capability 8.0 or later, a CPU "
                           "with AVX512_BF16 or AMX), fp16 on older CUDA GPUs, off on other "
                           "CPUs. auto is decided once, when a run starts: config.yaml and "
                           "last.ckpt record the choice, so a resume, even on another "
                           "machine, keeps it. Older recipes' bf16: true|false|auto means "
                           "amp: bf16|off|auto", choices=AMP_MODES)
    compile: bool = _opt(False, "run the model through torch.compile (the same weights and "
                                "checkpoints; the first step, which compiles, is reported "
                                "apart)")
    grad_checkpointing: bool = _opt(False, "recompute each block's activations in the backward "
                                           "pass instead of keeping them: a ViT-S/16 step at "
                                           "batch 8 peaks at 125 instead of 458 MiB and takes "
                                           "a third longer (benchmarks/grad_checkpointing.py)")
    # --- fine-tuning ---
    layer_decay: float | None = _opt(None, "layer-wise learning-rate decay (BEiT): the head "
                                           "trains at lr, each block below at the one above's "
                                           "lr times this, the embeddings lowest (ViT and "
                                           "Swin; 0.65-0.85 is usual; default: off, one lr)")
    accum_steps: int = _opt(1, "batches whose gradients are summed into one optimizer step: "
                               "the update of a batch N times larger (exactly so for models "
                               "without BatchNorm) in the memory of one; the schedule counts "
                               "optimizer steps")
    balance: str | None = _opt(None, "for classes of unequal size: sampler (draw every class "
                                     "equally often, with replacement) or loss (weigh each "
                                     "class's loss by the inverse of its frequency); "
                                     "default: off", choices=BALANCE_MODES)
    patience: int | None = _opt(None, "stop after N epochs without a better validation top-1 "
                                      "(best.safetensors keeps the best; default: train every "
                                      "epoch)")
    # --- distillation ---
    teacher: str | None = _opt(None, "a model to learn from besides the labels (DeiT's "
                                     "distillation): a vistra checkpoint (from `vistra train` "
                                     "or `vistra convert`), an .onnx file from `vistra export`, "
                                     "or a weights name in the local HuggingFace cache. It "
                                     "must have the folder's classes; it runs without "
                                     "gradients on each augmented batch, in its own size, "
                                     "channels and normalisation", metavar="MODEL")
    distill: str | None = _opt(None, "what the student learns from the teacher: hard (its top "
                                     "class, by cross-entropy) or soft (its probabilities at "
                                     "temperature distill_tau, by KL divergence). A distilled "
                                     "student (deit_*_distilled, or distilled: true) learns it "
                                     "in its distillation head, the class head the labels. "
                                     "Default: hard for a distilled student, soft for others",
                               choices=DISTILL_KINDS)
    distill_alpha: float = _opt(0.5, "the teacher's share of the loss: (1 - alpha) * label loss "
                                     "+ alpha * teacher loss")
    distill_tau: float = _opt(1.0, "temperature of soft distillation (the loss is scaled by "
                                   "its square)")
    teacher_sha256: str | None = _opt(None, "the SHA-256 the teacher must have (of its file; of "
                                            "its weights for a cached name). A run records its "
                                            "teacher's in config.yaml, so rerunning that file "
                                            "or resuming refuses another teacher",
                                      metavar="HEX")
    # --- after training ---
    explain_choose: bool = _opt(True, "score each explain method on validation images (ROAD and "
                                      "mean-colour deletion, insertion) and record the most "
                                      "faithful in best.safetensors: the default of `vistra "
                                      "explain` and `vistra serve` for this model")
    explain_choose_images: int = _opt(256, "the most validation images the explain choice "
                                           "scores")
    explain_choose_seconds: float = _opt(60.0, "the time the explain choice may take: fewer "
                                               "images when the methods are slow (the first "
                                               "image is scored whatever it takes)",
                                         metavar="S")
    # --- run ---
    seed: int = _opt(0, "seed of the split, the initialisation and every random draw")
    threads: int | None = _opt(None, "CPU threads per training process (default: torch's "
                                     "choice; 1 avoids contention when cores are shared)")
    device: str | None = _opt(None, "cpu, cuda, cuda:1, ... (default: cuda if available; under "
                                    "torchrun each process uses its LOCAL_RANK GPU)",
                              metavar="DEVICE")
    quiet: bool = _opt(False, "no progress bars or per-epoch lines")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.in_chans not in (None, 1, 3):
            raise ValueError(f"in_chans must be 1 or 3 (images are decoded as RGB), "
                             f"got {self.in_chans}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be positive minutes, got {self.time_budget}")
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"random_erasing must be a probability in [0, 1], "
                             f"got {self.random_erasing}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.explain_choose_images < 1 or self.explain_choose_seconds <= 0:
            raise ValueError("explain_choose_images must be 1 or more and "
                             "explain_choose_seconds positive, got "
                             f"{self.explain_choose_images} and {self.explain_choose_seconds}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        self._check_fine_tuning()
        self._check_distillation()

    def _check_fine_tuning(self) -> None:
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be 1 or more, got {self.accum_steps}")
        if self.balance not in (None, *BALANCE_MODES):
            raise ValueError(f"balance must be {' or '.join(BALANCE_MODES)}, "
                             f"got {self.balance!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be 1 or more epochs, got {self.patience}")

    def _check_distillation(self) -> None:
        if self.distill not in (None, *DISTILL_KINDS):
            raise ValueError(f"distill must be {' or '.join(DISTILL_KINDS)}, "
                             f"got {self.distill!r}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_tau <= 0:
            raise ValueError(f"distill_tau must be positive, got {self.distill_tau}")
        if self.teacher is None:
            given = [name for name in ("distill", "teacher_sha256") if getattr(self, name)]
            if given:
                raise ValueError(f"{' and '.join(given)} need a teacher: pass --teacher "
                                 "or set `teacher:`")

    def require_inputs(self) -> None:
        """Training needs a folder and a model; a config file may leave them to the CLI."""
        for name in ("data", "model"):
            if not getattr(self, name):
                raise ValueError(f"no {name} given: pass --{name} or set `{name}:` in the "
                                 "--config file")

    def model_overrides(self) -> dict[str, Any]:
        """Keyword arguments for `create_model` beyond name, weights and classes."""
        named = {"img_size": self.img_size, "in_chans": self.in_chans,
                 "drop_path_rate": self.drop_path}
        options = {"img_size": "img_size", "in_chans": "in_chans", "drop_path_rate": "drop_path",
                   "num_classes": "data (the number of class folders)"}
        for key in self.model_kwargs:
            if key in options:
                raise ValueError(f"model_kwargs must not set {key}; it comes from the "
                                 f"{options[key]} option")
        return {**self.model_kwargs, **{k: v for k, v in named.items() if v is not None}}

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so it can go into YAML, JSON and a weights_only checkpoint."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from loosely typed values (YAML, CLI), checking names and types.

    Keys may use '-' or '_'. Integers are accepted for float options and lists for pairs.
    """
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    converted = {}
    for key, value in read_amp(values, source).items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"{source}: unknown option {key!r}; known options: "
                             f"{', '.join(sorted(fields))}")
        converted[name] = _coerce(value, hints[name], f"{source}: {key}")
    return TrainConfig(**converted)


def read_amp(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`values` with amp as TrainConfig takes it: YAML's `amp: off` (read as false) as
    "off", and an older recipe's or checkpoint's bf16 (true, false or auto) as the amp it
    means (bf16, off or auto), refused where an amp beside it says otherwise."""
    values = dict(values)
    if values.get("amp") is False:
        values["amp"] = "off"
    key = next((k for k in values if k.replace("-", "_") == "bf16"), None)
    if key is None:
        return values
    bf16 = values.pop(key)
    if not (isinstance(bf16, bool) or bf16 == "auto"):
        raise ValueError(f"{source}: bf16 must be true, false or auto (it means amp: bf16, "
                         f"off or auto), got {bf16!r}")
    amp = values.setdefault("amp", BF16_AS_AMP[bf16])
    if amp != BF16_AS_AMP[bf16]:
        raise ValueError(f"{source}: bf16: {str(bf16).lower()} means amp: "
                         f"{BF16_AS_AMP[bf16]}, but amp is {amp!r}; keep amp only")
    return values


def _coerce(value: Any, hint: Any, where: str) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{where} must not be empty")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is tuple and isinstance(value, (list, tuple)):
            kinds = typing.get_args(option)
            if len(value) == len(kinds):
                return tuple(_coerce(v, k, where) for v, k in zip(value, kinds, strict=True))
        elif origin is dict and isinstance(value, dict):
            return dict(value)
        elif origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif origin in (int, str, bool) and type(value) is origin:
            return value
    wanted = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise ValueError(f"{where} must be {wanted}, got {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if origin is dict:
        return "a mapping"
    return f"a {hint.__name__}"


def read_yaml_options(path: str | os.PathLike) -> dict[str, Any]:
    """The option mapping of a YAML recipe file (not yet checked against TrainConfig)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, "
                         f"found a {type(values).__name__}")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def load_config(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A YAML recipe as a TrainConfig; `overrides` (e.g. from the command line) win.

    model_kwargs are merged key by key, so overriding `depth` keeps the recipe's patch_size.
    """
    # Each source's bf16 read as amp on its own, so the command line's amp wins a recipe's.
    values = read_amp(read_yaml_options(path), str(path))
    overrides = read_amp(overrides, "command line")
    if isinstance(values.get("model_kwargs"), dict) and "model_kwargs" in overrides:
        overrides = {**overrides,
                     "model_kwargs": {**values["model_kwargs"], **overrides["model_kwargs"]}}
    return config_from_dict({**values, **overrides}, source=str(path))
