"""A classifier ready to run: the model (or an exported graph), its class names and the
preprocessing it needs, behind one small interface shared by predict, eval and serve.

`load_classifier(path)` picks the backend from the file: a vistra .safetensors runs in
PyTorch on any device (fp32, or cast to bf16 where the device computes it natively, fp16 on
older GPUs; or an fp32 model under autocast; compiled if asked), an .onnx file written by
`vistra export` in onnxruntime, with the preprocessing its metadata records.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vistra.accel import amp_dtype, enable_tf32, optimize, resolve_amp, resolve_dtype
from vistra.accel.capabilities import TORCH_DTYPES
from vistra.data import Transform, eval_transform, eval_transform_for
from vistra.fileio import file_sha256
from vistra.models import DataConfig, ExplainChoice
from vistra.onnx import OnnxRunner
from vistra.weights import load_checkpoint


def mean_logits(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A distilled DeiT in training mode returns (logits, logits_dist): use their mean."""
    return torch.stack(output).mean(0) if isinstance(output, tuple) else output


# Which logits of a distilled DeiT to use: its class head's, its distillation head's, or
# their mean (what it answers in eval mode, and what any other model's one head gives).
HEADS = ("mean", "cls", "dist")


def is_distilled(model: torch.nn.Module) -> bool:
    """Whether the model has a distillation head besides its class head (DeiT)."""
    return bool(getattr(model.arch, "distilled", False))


def head_logits(model: torch.nn.Module, head: str = "mean"
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """batch -> the logits of `head` (HEADS) of `model` in eval mode; cls and dist only for
    a distilled model."""
    check_head(head, is_distilled(model), getattr(model, "name", type(model).__name__))
    if head == "mean":
        return lambda batch: mean_logits(model(batch))
    index = HEADS.index(head) - 1  # DistilledLogits: (class head, distillation head)
    return lambda batch: model.forward_heads(batch)[index]


def check_head(head: str, distilled: bool, name: str) -> None:
    """Refuse a head the model does not have."""
    if head not in HEADS:
        raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if head != "mean" and not distilled:
        raise ValueError(f"--head {head} is for distilled models (a class and a distillation "
                         f"head: deit_*_distilled, or trained with distilled: true); {name} "
                         "has one head: use --head mean (the default)")


@dataclass
class Classifier:
    """What every backend offers: `transform` turns a PIL image into the model's input
    [C, H, W]; calling the classifier on a batch [B, C, H, W] returns logits [B, K]."""

    name: str
    classes: list[str] | None
    data_config: DataConfig
    in_chans: int
    source: Path
    backend: str
    transform: Transform
    run: Callable[[torch.Tensor], torch.Tensor]
    model: torch.nn.Module | None = None  # the PyTorch module, when the backend has one
    _sha256: str | None = None
    dtype: str = "fp32"  # what the backend computes in: fp32, bf16, fp16 or int8
    head: str = "mean"  # a distilled model's head it answers with (HEADS)
    amp: str = "off"  # the autocast an fp32 torch model runs under: bf16, fp16 or off
    device: str = "cpu"  # where it computes (batches may come from anywhere)
    explain: ExplainChoice | None = None  # an .onnx file's recorded explain method, if any

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    @property
    def checkpoint_hash(self) -> str | None:
        """SHA-256 of the file it was loaded from (computed once, on first use); None for a
        model given in memory."""
        if self._sha256 is None and self.source.is_file():
            self._sha256 = file_sha256(self.source)
        return self._sha256


BACKENDS = ("auto", "torch", "onnx")


def torch_classifier(path: str | os.PathLike, device: str = "cpu", dtype: str = "fp32",
                     head: str = "mean", amp: str = "off", compile: bool = False
                     ) -> Classifier:
    """A vistra checkpoint in PyTorch on `device` (a distilled DeiT: the mean of its heads,
    or the one `head` names), made ready by vistra.optimize; dtype bf16 or fp16 casts the
    model once, amp bf16 or fp16 runs it under that autocast, `compile` through
    torch.compile (its first batches of each size compile); an fp32 model on a GPU with TF32
    runs its matrix products in TF32 (process-wide). Batches may come from the CPU; logits
    come back there, in fp32."""
    dev = torch.device(device)
    compute = TORCH_DTYPES[dtype]
    if dtype == "fp32":
        enable_tf32(dev)
    model = optimize(load_checkpoint(path, device=device), compute)
    if compile:
        model.compile()
    logits = head_logits(model, head)
    autocast = amp_dtype(amp)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            out = logits(batch.to(dev, compute, non_blocking=True))
        return out.float().cpu()

    return Classifier(model.name, model.classes, model.data_config, model.arch.in_chans,
                      Path(path), "torch", eval_transform(model), run, model=model, dtype=dtype,
                      head=head, amp=amp, device=str(dev))


def module_classifier(model: torch.nn.Module, head: str = "mean") -> Classifier:
    """A model in hand (with .name, .classes, .data_config, .arch) as a Classifier."""
    device = next(model.parameters()).device
    logits = head_logits(model, head)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        model.eval()
        return logits(batch.to(device)).float().cpu()

    return Classifier(getattr(model, "name", type(model).__name__), getattr(model, "classes", None),
                      model.data_config, model.arch.in_chans, Path(), "torch",
                      eval_transform(model), run, model=model, head=head, device=str(device))


def onnx_classifier(path: str | os.PathLike, threads: int | None = None) -> Classifier:
    """An .onnx file from `vistra export` in onnxruntime (vistra.onnx.OnnxRunner); a
    .safetensors is exported first, in memory. The preprocessing, and the explain method
    measured for the model, are the ones the file records."""
    runner = OnnxRunner(path, threads)
    meta = runner.metadata
    return Classifier(meta.name, meta.classes, meta.data_config, meta.in_chans, Path(path),
                      "onnx", eval_transform_for(meta.data_config, meta.in_chans), runner,
                      dtype=runner.dtype, explain=meta.explain)


def resolve_backend(path: str | os.PathLike, backend: str = "auto") -> str:
    """The backend that runs `path`: auto is onnx for an .onnx file, torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    is_onnx = Path(path).suffix.lower() == ".onnx"
    if backend == "torch" and is_onnx:
        raise ValueError(f"{path} is an ONNX graph: run it with --backend onnx (or auto)")
    if backend == "auto":
        return "onnx" if is_onnx else "torch"
    return backend


def load_classifier(path: str | os.PathLike, device: str = "cpu", *, backend: str = "auto",
                    dtype: str = "fp32", head: str = "mean", amp: str = "off",
                    compile: bool = False) -> Classifier:
    """The classifier a file holds. backend: see resolve_backend; onnx for a .safetensors
    exports it in memory first. dtype: fp32 (the default, the same numbers on every
    machine), bf16, fp16, or auto: see resolve_dtype (the chosen one is in `.dtype`). amp:
    off (the default), bf16, fp16 or auto (resolve_amp): the fp32 model under autocast, as
    training validates (with dtype auto only, which then means fp32). compile: through
    torch.compile. head: for a distilled DeiT, mean (the default: what it answers in eval
    mode), cls (its class head) or dist (its distillation head). amp, compile and head are
    for the torch backend: an exported graph computes as exported and holds the mean."""
    backend = resolve_backend(path, backend)
    chosen, autocast = resolve_precision(dtype, amp, backend, device)
    if compile:
        _check_torch_only(backend, "--compile")
    if backend == "onnx":
        check_head(head, True, str(path))  # a known name; then only the mean is there
        if head != "mean":
            raise ValueError(f"--head {head} needs the torch backend: an exported graph "
                             "answers with the mean of a distilled model's heads; use the "
                             ".safetensors checkpoint with --backend torch")
        if torch.device(device).type != "cpu":
            raise ValueError("the onnx backend runs on the CPU; use --device cpu")
        return onnx_classifier(path)
    return torch_classifier(path, device=device, dtype=chosen, head=head, amp=autocast,
                            compile=compile)


def resolve_precision(dtype: str, amp: str, backend: str, device: str = "cpu"
                      ) -> tuple[str, str]:
    """(dtype, amp) resolved for `backend` on `device`: dtype as resolve_dtype, amp as
    resolve_amp. An amp other than off autocasts an fp32 model: dtype auto then means fp32,
    and another dtype is refused."""
    chosen, autocast = resolve_dtype(dtype, backend, device), resolve_amp(amp, device)
    if autocast == "off":
        return chosen, autocast
    _check_torch_only(backend, f"--amp {amp}")
    if dtype not in ("auto", "fp32"):
        raise ValueError(f"--amp {amp} runs an fp32 model under autocast, --dtype {dtype} casts "
                         "the model itself: choose one of them")
    return "fp32", autocast


def _check_torch_only(backend: str, option: str) -> None:
    if backend != "torch":
        raise ValueError(f"{option} is for the torch backend; the onnx backend computes as the "
                         "graph was exported (fp32, or int8 from `vistra export --int8`)")
