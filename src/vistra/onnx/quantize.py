"""int8 copies of an exported file, in the two kinds onnxruntime provides:

- dynamic (`quantize_int8`): int8 weights, activations quantised per batch at run time, each
  range computed while the model runs; needs no data;
- static (`quantize_int8_static`): the activations' ranges measured once, on calibration
  images, and stored in the file as QuantizeLinear/DequantizeLinear pairs (QDQ) around each
  layer with weights: Conv (conv stems, patch embeddings), MatMul and Gemm; onnxruntime fuses
  each into an integer kernel when it loads the file.

Both carry the metadata over (the measured explain method included) and record the kind of
quantisation (static: with the number of calibration images); LayerNorm, Softmax, GELU, the
residual adds, the attention products and Swin's window gathers stay in float.

Weights take 7 bits in both (onnxruntime's reduce_range), the activations 8 (u8). On x86
onnxruntime multiplies u8 activations by s8 weights (it turns a QDQ file's s8 activations
into u8 when it loads it), and on CPUs without VNNI (AVX2, AVX-512 before VNNI) that kernel
adds neighbouring products in saturating 16 bits: 255 x 127 x 2 overflows, 255 x 64 x 2 does
not. With 8-bit weights a small Fashion-MNIST ViT agreed with fp32 on 93.2% of test images on
such a CPU, 99.6% with 7 bits. With VNNI the sums are 32-bit and the seventh bit costs only
precision; a file must answer alike on every CPU it is copied to, so both get the same file.

Both files name their intermediate tensors t0, t1, ... and their nodes not at all
(`compact_names`): the exporter's names spell each tensor's module path
("/layers/layers.0/blocks/blocks.0/norm1/LayerNormalization_output_0"), and at int8 the graph
of a small model weighs as much as its weights (a 28x28 Swin's: 1,139 nodes, 9% of the fp32
file). The weights keep their names.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vistra.data import ImageLoadError, eval_transform_for, find_images, load_rgb
from vistra.onnx.export import INPUT_NAME, write_new
from vistra.onnx.metadata import OnnxMetadata, read_onnx_metadata

DEFAULT_CALIBRATION_IMAGES = 200
# The operators static quantisation makes integer where they have weights: they hold nearly
# all the multiply-adds. MatMul and Gemm keep a float output (onnxruntime's
# MatMulIntegerToFloat and QGemm scale their int32 sums straight to float): a quantised output
# would cost a round trip through u8 before the float LayerNorm or residual add that follows,
# and would round the logits to 256 levels, where near ties become exact ties. Conv's output
# is quantised, as onnxruntime's integer Conv (QLinearConv) requires.
STATIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]
FLOAT_OUTPUTS = ["MatMul", "Gemm"]
_CALIBRATION_BATCH = 8


def _check_out(out: str | os.PathLike, force: bool) -> None:
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force")


def _write_with_metadata(quantized: Path, meta: OnnxMetadata, out: str | os.PathLike,
                         force: bool) -> Path:
    import onnx

    proto = onnx.load(str(quantized))
    del proto.metadata_props[:]
    # Shape inference's notes on intermediate tensors (static quantisation's pre-processing):
    # onnxruntime infers them again on load, and they are 8% of a small Swin's file.
    del proto.graph.value_info[:]
    compact_names(proto.graph)
    onnx.helper.set_model_props(proto, meta.to_props())
    return write_new(out, proto.SerializeToString(), force)


EXPORTER_NAMES = ("/", "onnx::")  # the exporter's names of intermediates and constants


def compact_names(graph) -> None:
    """Rename the graph's intermediate tensors and constants (the quantisation scales of
    activations among them) t0, t1, ... and drop the node names; the inputs, outputs and
    the weights (with their scales) keep theirs. A graph with subgraphs (If,
    Loop), whose bodies may read outer names, is left as it is."""
    if any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute):
        return
    kept = {v.name for v in graph.input} | {v.name for v in graph.output} | {
        t.name for t in graph.initializer if not t.name.startswith(EXPORTER_NAMES)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        return name if not name or name in kept else names.setdefault(name, f"t{len(names)}")
    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
        node.name = ""


def quantize_int8(src: str | os.PathLike, out: str | os.PathLike, *, per_channel: bool = True,
                  force: bool = False) -> Path:
    """onnxruntime dynamic quantisation: int8 weights, activations quantised per batch at run
    time; the metadata is carried over. Per-channel weight scales by default: on a small
    Fashion-MNIST ViT they agreed with fp32 on 99% of the test images, per-tensor on 98%.
    Weights use 7 bits (see the module's note on CPUs without VNNI)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_out(out, force)
    meta = read_onnx_metadata(src)
    kind = "int8-dynamic-per-channel" if per_channel else "int8-dynamic"
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(src), str(quantized), weight_type=QuantType.QInt8,
                         per_channel=per_channel, reduce_range=True)
        return _write_with_metadata(quantized, dataclasses.replace(meta, quantization=kind),
                                    out, force)


def calibration_images(folder: str | os.PathLike, count: int) -> list[Path]:
    """`count` images of `folder` (listed as `vistra predict` lists a folder), spread evenly
    over the sorted list so that every class folder is represented, not the first ones only.
    Raises ValueError naming the folder when it is missing, unreadable or holds no images."""
    folder = Path(folder)
    if count < 1:
        raise ValueError(f"the number of calibration images must be at least 1, got {count}")
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"calibration folder {folder} {reason}; give a folder of images like "
                         "those the model will classify")
    images, _ = find_images([folder])
    if not images:
        raise ValueError(f"calibration folder {folder} holds no image files it can read; give "
                         "a folder of images like those the model will classify")
    step = len(images) / min(count, len(images))
    return [images[int(i * step)] for i in range(min(count, len(images)))]


def _calibration_batches(images: list[Path], meta: OnnxMetadata) -> Iterator[np.ndarray]:
    """The images preprocessed as evaluation does (the file's own data config), in batches."""
    transform = eval_transform_for(meta.data_config, meta.in_chans)
    for start in range(0, len(images), _CALIBRATION_BATCH):
        batch = []
        for path in images[start:start + _CALIBRATION_BATCH]:
            try:
                batch.append(transform(load_rgb(path)).numpy())
            except ImageLoadError as error:
                raise ValueError(f"calibration image {path} cannot be read ({error.reason}); "
                                 "remove it from the folder or choose another") from None
        yield np.stack(batch)


def _activation_products(model_path: Path) -> list[str]:
    """The MatMul nodes that multiply two activations (attention's q.k and p.v), which static
    quantisation leaves in float. Quantising them costs four quantise passes per attention
    block for small products (Swin's 49-token windows) and brought no speed on Swin-T; on a
    small Fashion-MNIST ViT it tripled the largest logit error (1.1% to 3.6% of the largest
    logit)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and node.input[1] not in weights]


def quantize_int8_static(src: str | os.PathLike, out: str | os.PathLike,
                         calibration: str | os.PathLike, *,
                         images: int = DEFAULT_CALIBRATION_IMAGES, per_channel: bool = True,
                         force: bool = False) -> Path:
    """onnxruntime static quantisation in QDQ form: int8 weights (per output channel by
    default) and int8 activations whose ranges (min and max) are measured on up to `images`
    images of the folder `calibration`, preprocessed as the file's metadata prescribes, at
    the export size. Every Conv, MatMul and Gemm with weights is quantised, with u8
    activations and 7-bit s8 weights (see the module's note). Raises ValueError for a
    calibration folder without readable images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_out(out, force)
    meta = read_onnx_metadata(src)
    chosen = calibration_images(calibration, images)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _calibration_batches(chosen, meta)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    kind = "int8-static-qdq-per-channel" if per_channel else "int8-static-qdq"
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # ONNX shape inference and onnxruntime's constant folding, as onnxruntime advises
        # before quantising; its symbolic shape inference cannot follow Swin's window layout,
        # which the graph computes from the input size, so it is skipped.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=STATIC_OP_TYPES,
                        nodes_to_exclude=_activation_products(prepared), per_channel=per_channel,
                        reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"OpTypesToExcludeOutputQuantization": FLOAT_OUTPUTS})
        meta = dataclasses.replace(meta, quantization=kind, calibration_images=len(chosen))
        return _write_with_metadata(quantized, meta, out, force)
