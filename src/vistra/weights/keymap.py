"""Small tools the per-source converters share: rename keys by pattern, fuse q/k/v."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

Tensors = dict[str, torch.Tensor]
Rule = tuple[str, str | Callable[[re.Match], str]]


def rename(state: Tensors, rules: list[Rule]) -> Tensors:
    """Each key is matched in full against the rules' patterns, first match wins; keys no rule
    matches pass through unchanged, so the loader reports them instead of losing them."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out: Tensors = {}
    for key, value in state.items():
        for pattern, repl in compiled:
            match = pattern.fullmatch(key)
            if match:
                key = repl(match) if callable(repl) else match.expand(repl)
                break
        out[key] = value
    return out


def fuse_qkv(state: Tensors) -> Tensors:
    """`X.attn.q.weight`, `X.attn.k.weight`, `X.attn.v.weight` (and biases) -> one
    `X.attn.qkv.weight` stacked in q, k, v order, the layout of vistra's fused Linear.
    An incomplete triple is left as it is, for the loader to report."""
    out: Tensors = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*\.attn)\.([qkv])\.(weight|bias)", key)
        parts = [f"{match[1]}.{p}.{match[3]}" for p in "qkv"] if match else []
        if not parts or not all(p in state for p in parts):
            out[key] = value
        elif match[2] == "q":
            out[f"{match[1]}.qkv.{match[3]}"] = torch.cat([state[p] for p in parts])
    return out
