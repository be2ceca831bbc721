"""Export a vistra model to ONNX: one file that carries its preprocessing and class names and
runs in onnxruntime with the same logits as PyTorch, checked before the file is written.

The TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) is used: it exports
vistra's small models 4-15x faster than the torch.export-based one, and both bake Python-level
decisions into the graph, so neither makes a size dynamic for free. Under tracing the models
take paths whose sizes come from the input: ViT resamples its position embeddings (and the
R50 hybrid computes its SAME padding) in the graph; Swin computes padding, window gathers
and shift mask in the graph (the trap of timm#1844 and Swin-Transformer#314 is a graph that
holds them as constants of one size).
The batch is always dynamic. The sizes the graph computes right are the model family's rule
(`ModelFamily.export_size_rule`: ViT and Swin declare theirs in vistra.models.family; a
family without one is exported at its own size only) and are recorded in the file. Every
export is verified against eager PyTorch at the export size and at a second size the rule
allows; should that fail, the graph's height and width are fixed instead, so onnxruntime
refuses other sizes rather than answering wrongly.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vistra.fileio import atomic_write_bytes, file_sha256
from vistra.models import get_family
from vistra.onnx.metadata import OnnxMetadata
from vistra.weights import load_checkpoint

DEFAULT_OPSET = 17
INPUT_NAME = "image"  # the graph's one input: a batch [B, C, H, W]
STANDARD_DOMAINS = ("", "ai.onnx")
_MAX_PROTO_BYTES = 2_000_000_000  # protobuf's 2 GB limit for a single-file model


def foreign_ops(model_proto) -> list[str]:
    """Operators outside the standard ONNX domain ("domain::op"), which other runtimes lack."""
    return sorted({f"{n.domain}::{n.op_type}" for n in model_proto.graph.node
                   if n.domain not in STANDARD_DOMAINS})


def _trace(model: nn.Module, sample: torch.Tensor, opset: int) -> bytes:
    """The model as ONNX bytes, batch, height and width declared dynamic; traced without
    autograd."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at each Python-level decision on a shape; the export's own test at
        # a second size is what tells whether one of them matters.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False: chosen, see above
        torch.onnx.export(model, (sample,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=["logits"],
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch"}})
    return buffer.getvalue()


def _eager_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eager reference logits at any size the family's rule allows (a ViT built for one size
    resamples, as the graph does)."""
    with get_family(model).resizable(model), torch.no_grad():
        return model(x).float().numpy()


def _max_error(session, model: nn.Module, x: torch.Tensor) -> float:
    """Largest |onnxruntime - eager| over the logits, relative to the logits' scale (>= 1)."""
    reference = _eager_logits(model, x)
    out = session.run(None, {INPUT_NAME: x.numpy()})[0]
    return float(np.abs(out - reference).max() / max(1.0, float(np.abs(reference).max())))


def size_rule(model: nn.Module) -> tuple[int, int]:
    """(multiple, minimum) of the image heights and widths the traced graph computes right:
    the model family's `export_size_rule`; (0, the export size's shorter side) for a family
    that declares none, whose graph takes the export size only."""
    rule = get_family(model).export_size_rule
    return rule(model) if rule is not None else (0, min(model.data_config.img_size))


def _probe_size(model: nn.Module, multiple: int) -> tuple[int, int]:
    """A second, non-square image size to test the graph at."""
    h, w = model.data_config.img_size
    return h + 2 * multiple, w + 4 * multiple


def _fix_image_size(model_proto, height: int, width: int) -> None:
    """Declare the input's height and width fixed, so onnxruntime rejects other sizes."""
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    for dim, value in ((dims[2], height), (dims[3], width)):
        dim.Clear()
        dim.dim_value = value


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: OnnxMetadata
    max_error: float  # relative to the logits' scale, at the export size, batch 3
    probe_size: tuple[int, int] | None  # the second size tested; None: the family has no rule
    probe_error: float  # above tolerance (inf: did not run): the size was fixed; nan: no probe


def export_onnx_bytes(model: nn.Module, *, opset: int = DEFAULT_OPSET,
                      source_sha256: str = "", tolerance: float = 1e-4
                      ) -> tuple[bytes, ExportResult]:
    """The ONNX file's bytes for a vistra model (with .name, .data_config, .arch, .classes,
    .card.explain), verified against eager PyTorch. Raises ValueError when the graph is not
    right at the export size or holds non-standard operators."""
    import onnx
    import onnxruntime as ort

    model = model.eval().cpu()
    if sum(p.numel() * p.element_size() for p in model.parameters()) > _MAX_PROTO_BYTES:
        raise ValueError(f"{model.name} has more than 2 GB of weights: a single-file ONNX "
                         "model cannot hold it (external-data export is not supported)")
    h, w = model.data_config.img_size
    in_chans = model.arch.in_chans
    generator = torch.Generator().manual_seed(0)
    proto = onnx.load_from_string(_trace(model, torch.randn(2, in_chans, h, w,
                                                            generator=generator), opset))
    if bad := foreign_ops(proto):
        raise ValueError(f"the exported graph of {model.name} holds non-standard operators "
                         f"({', '.join(bad)}); export the plain model, not vistra.optimize's")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    error = _max_error(session, model, torch.randn(3, in_chans, h, w, generator=generator))
    # At the export size onnxruntime must run: an error there is a bug to show, not a size.
    if not error <= tolerance:
        raise ValueError(f"the exported graph of {model.name} differs from PyTorch by "
                         f"{error:.2e} (relative) at {h}x{w}; not writing it")
    multiple, smallest = size_rule(model)
    probe, probe_error = None, float("nan")
    if multiple:
        probe = _probe_size(model, multiple)
        try:
            probe_error = _max_error(session, model, torch.randn(1, in_chans, *probe,
                                                                 generator=generator))
        except Exception:  # noqa: BLE001 - onnxruntime raises its own types for shape errors
            probe_error = float("inf")  # the graph cannot take another size
        if not probe_error <= tolerance:  # a safety net: refuse other sizes rather than err
            multiple, smallest = 0, min(h, w)
    if not multiple:
        _fix_image_size(proto, h, w)
    # The measured explain method travels with the file, for the methods that only run it.
    meta = OnnxMetadata(model.name, model.classes, model.data_config, in_chans, multiple,
                        smallest, source_sha256, explain=model.card.explain)
    onnx.helper.set_model_props(proto, meta.to_props())
    return proto.SerializeToString(), ExportResult(Path(), meta, error, probe, probe_error)


def write_new(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """Write `data` to `path` atomically (vistra.fileio); an existing file is replaced only
    with `force`."""
    try:
        return atomic_write_bytes(path, data, replace=force)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; choose another --out or pass --force") from None


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                      opset: int = DEFAULT_OPSET, force: bool = False) -> ExportResult:
    """Export a vistra .safetensors checkpoint to a verified .onnx file at `out`."""
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force")
    model = load_checkpoint(checkpoint)
    data, result = export_onnx_bytes(model, opset=opset, source_sha256=file_sha256(checkpoint))
    return dataclasses.replace(result, path=write_new(out, data, force))
