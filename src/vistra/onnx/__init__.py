"""ONNX, the export target: a vistra model as one verified file (`export`), what that file
records about itself (`metadata`), its int8 copies (`quantize`: dynamic, or static from
calibration images), and the file run in onnxruntime (`backend`, behind
vistra.runtime's onnx backend).

    from vistra.onnx import export_checkpoint, read_onnx_metadata
    result = export_checkpoint("run/best.safetensors", "model.onnx")
    read_onnx_metadata("model.onnx").classes

The onnx and onnxruntime libraries load on first use, not on import.
"""

from vistra.onnx.backend import OnnxRunner
from vistra.onnx.export import (
    DEFAULT_OPSET,
    ExportResult,
    export_checkpoint,
    export_onnx_bytes,
    foreign_ops,
    size_rule,
    write_new,
)
from vistra.onnx.metadata import OnnxMetadata, read_onnx_metadata
from vistra.onnx.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    calibration_images,
    quantize_int8,
    quantize_int8_static,
)

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_OPSET",
    "ExportResult",
    "OnnxMetadata",
    "OnnxRunner",
    "calibration_images",
    "export_checkpoint",
    "export_onnx_bytes",
    "foreign_ops",
    "quantize_int8",
    "quantize_int8_static",
    "read_onnx_metadata",
    "size_rule",
    "write_new",
]
