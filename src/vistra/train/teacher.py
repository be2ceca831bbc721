"""The teacher of knowledge distillation: any model vistra loads, run without gradients on
the student's augmented batch.

Each model sees the batch in its own preprocessing: the student's normalisation is undone,
the channels converted (a grey level repeated for an RGB teacher; RGB weighed into a grey
level as Pillow's "L" conversion does for a grey-level teacher), the images resized to the
teacher's input size and normalised with its mean and std. The teacher answers for the
folder's classes in the folder's order, whatever order its own head has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vistra.accel import optimize, resolve_dtype
from vistra.accel.capabilities import TORCH_DTYPES
from vistra.factory import create_model
from vistra.fileio import file_sha256
from vistra.models import DataConfig
from vistra.runtime import load_classifier, mean_logits
from vistra.weights import load_checkpoint
from vistra.weights.hub import is_hub_name, is_tagged_model_name

LUMA = (0.299, 0.587, 0.114)  # Pillow's RGB -> "L" weights (ITU-R 601-2)


@dataclass(frozen=True)
class InputFormat:
    """What a model's input tensor holds: images of `size` (height, width) in `channels`
    (3 RGB, 1 grey level), each (pixel / 255 - mean) / std."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def of(cls, data_config: DataConfig, channels: int) -> InputFormat:
        """A model's format; a grey-level model normalises with the first channel's numbers,
        as its transforms do (vistra.data.fit_channels)."""
        return cls(tuple(data_config.img_size), channels, tuple(data_config.mean[:channels]),
                   tuple(data_config.std[:channels]), data_config.interpolation)

    def __str__(self) -> str:
        kind = "RGB" if self.channels == 3 else "grey"
        return (f"{self.size[0]}x{self.size[1]} {kind}, mean ({_numbers(self.mean)}), "
                f"std ({_numbers(self.std)})")


def _numbers(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def convert_batch(images: torch.Tensor, source: InputFormat,
                  target: InputFormat) -> torch.Tensor:
    """`images` [B, C, H, W] in the `source` format as `target` has them: the normalisation
    undone, the channels converted, resized (antialiased, with target's interpolation) and
    normalised again. Unchanged when the two formats agree."""
    same = (source.size, source.channels, source.mean, source.std) == \
        (target.size, target.channels, target.mean, target.std)
    if same:
        return images
    x = images.float()
    pixels = x * _column(source.std, x) + _column(source.mean, x)  # [B, C, H, W] in [0, 1]
    if source.channels == 1 and target.channels == 3:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif source.channels == 3 and target.channels == 1:
        pixels = (pixels * _column(LUMA, x)).sum(1, keepdim=True)
    if tuple(pixels.shape[-2:]) != target.size:
        mode = "bicubic" if target.interpolation == "bicubic" else "bilinear"
        pixels = F.interpolate(pixels, size=target.size, mode=mode, align_corners=False,
                               antialias=True)
    return (pixels - _column(target.mean, x)) / _column(target.std, x)


def _column(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class TeacherIdentity:
    """Which teacher a run learnt from: what it was given as, its file's name, the SHA-256
    (of the file; of the weights for a name in the cache) and the model's name."""

    source: str
    file: str
    sha256: str
    model: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TeacherModel:
    """A loaded teacher: `run` maps a batch in `input_format` to logits [B, its classes]."""

    identity: TeacherIdentity
    input_format: InputFormat
    classes: list[str] | None
    num_classes: int | None
    run: Callable[[torch.Tensor], torch.Tensor]
    dtype: str  # what it computes in: fp32, bf16 or fp16


def load_teacher(source: str, device: torch.device | str = "cpu",
                 dtype: str = "auto") -> TeacherModel:
    """The teacher `source` names: an .onnx file (`vistra export`; run by onnxruntime on
    the CPU), a vistra checkpoint (`vistra train`, `vistra convert`), or a weights name in
    the local HuggingFace cache (a timm-tagged model name, hf-hub:ORG/NAME or ORG/NAME).
    dtype: fp32, bf16, fp16, or auto: bf16 where the device computes it natively, fp16 on
    an older GPU (vistra.accel.resolve_dtype)."""
    device = torch.device(device)
    path = Path(source)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"teacher {source} does not exist")
        classifier = load_classifier(path, "cpu", backend="onnx")
        return TeacherModel(
            TeacherIdentity(source, path.name, file_sha256(path), classifier.name),
            InputFormat.of(classifier.data_config, classifier.in_chans), classifier.classes,
            len(classifier.classes) if classifier.classes else None,
            lambda batch: classifier(batch.float().cpu()).to(device), classifier.dtype)
    if path.is_file():
        model = load_checkpoint(path, device=device)
        identity = TeacherIdentity(source, path.name, file_sha256(path), model.name)
    elif is_tagged_model_name(source) or is_hub_name(source):
        model = create_model(source, pretrained=True if is_tagged_model_name(source) else None)
        identity = TeacherIdentity(source, source, weights_sha256(model), model.name)
        model.to(device)
    else:
        raise FileNotFoundError(
            f"teacher {source}: no such file, nor a weights name of the local HuggingFace "
            "cache (a timm-tagged model name such as vit_small_patch16_224.augreg_in21k_ft_in1k,"
            " hf-hub:ORG/NAME or ORG/NAME)")
    chosen = resolve_dtype(dtype, "torch", str(device))
    compute = TORCH_DTYPES[chosen]
    model = optimize(model, compute)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return mean_logits(model(batch.to(device, compute))).float()

    return TeacherModel(identity, InputFormat.of(model.data_config, model.arch.in_chans),
                        model.classes, model.arch.num_classes, run, chosen)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: each tensor's name, shape, dtype and bytes in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}\t{tuple(tensor.shape)}\t{tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Teacher:
    """A teacher fitted to a student: called on the student's batch, it returns its logits
    [B, classes] (fp32, no gradient) for the folder's classes in the folder's order."""

    model: TeacherModel
    student: InputFormat
    order: torch.Tensor | None  # the teacher's output for each of the folder's classes

    @classmethod
    def fit(cls, model: TeacherModel, student: InputFormat, classes: list[str]) -> Teacher:
        return cls(model, student, _class_order(model, classes))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model.run(convert_batch(images, self.student, self.model.input_format))
        return logits if self.order is None else logits[:, self.order.to(logits.device)]


def _class_order(model: TeacherModel, classes: list[str]) -> torch.Tensor | None:
    """None when the teacher's outputs are the folder's classes in order; the index of each
    class among the teacher's outputs when they are the same names in another order."""
    source = model.identity.source
    names = model.classes
    if names is None or names == classes:
        if model.num_classes not in (None, len(classes)):
            raise ValueError(f"teacher {source} has {model.num_classes} classes, the data "
                             f"{len(classes)}; distil from a teacher of the folder's classes")
        return None
    if sorted(names) == sorted(classes):
        return torch.tensor([names.index(name) for name in classes])
    raise ValueError(f"teacher {source} knows {len(names)} classes ({_some(names)}), the data "
                     f"has {len(classes)} ({_some(classes)}); distil from a teacher trained on "
                     "the folder's classes (the same names)")


def _some(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
