"""One switch for vistra's CPU fast paths (oneDNN fused linear, in-place residual adds, cached
biases and layouts), in the manner of timm's `fused_attn` flag.

The fast paths are the default for eager inference. The plain reference path beside each of
them is what export, `torch.compile`, hooks and analysis should see: standard operators, no
state kept between calls. `VISTRA_FAST_PATHS=0` in the environment starts with them off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_enabled = os.environ.get("VISTRA_FAST_PATHS", "1").strip().lower() not in ("0", "false", "no")


def enabled() -> bool:
    """Whether the fast paths may be taken now (each also checks that it applies): switched on,
    and no tracer is recording the model. torch.jit tracing, ONNX export (either exporter) and
    torch.compile / torch.export must see the plain path: a graph cannot hold a private oneDNN
    op or a cache filled on an earlier call."""
    return _enabled and not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                             or torch.onnx.is_in_onnx_export())


def set_enabled(flag: bool) -> None:
    """Switch the fast paths on or off for the whole process."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every model takes its plain reference path."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
