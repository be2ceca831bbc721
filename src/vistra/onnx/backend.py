"""An exported graph in onnxruntime: the onnx backend of vistra.runtime's Classifier.

onnxruntime is imported when a graph is opened, so importing vistra does not load it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vistra.fileio import file_sha256
from vistra.onnx.export import export_onnx_bytes
from vistra.onnx.metadata import OnnxMetadata
from vistra.weights import load_checkpoint


class OnnxRunner:
    """An .onnx file from `vistra export` in an onnxruntime session; a .safetensors is
    exported first, in memory (nothing is written). Calling it on a batch [B, C, H, W]
    returns logits [B, K]; `metadata` is what the graph records about itself. `threads`:
    onnxruntime's intra-op threads (default: torch's setting, so --threads /
    OMP_NUM_THREADS mean the same for both backends)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        if path.suffix.lower() == ".onnx":
            graph: bytes | str = str(path)
        else:
            graph, _ = export_onnx_bytes(load_checkpoint(path), source_sha256=file_sha256(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.metadata = OnnxMetadata.from_props(self.session.get_modelmeta().custom_metadata_map,
                                                path)
        self._input = self.session.get_inputs()[0].name

    @property
    def dtype(self) -> str:
        """What the graph computes in: int8 for a quantised file, else fp32."""
        return "int8" if self.metadata.quantization.startswith("int8") else "fp32"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.metadata.check_size(*batch.shape[-2:])
        images = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self._input: images})[0])
