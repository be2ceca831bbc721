"""vistra.explain: maps checked against references written from the papers' definitions,
their location on a task with a known answer, and the files the command writes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vistra
from vistra.cli import main
from vistra.explain import Explanation, explain, explain_batch, methods_for, overlay
from vistra.explain.faithfulness import auc, curves
from vistra.explain.swin import swin_blocks
from vistra.models import SwinConfig, SwinTransformer, VisionTransformer, ViTConfig
from vistra.weights.vistra_file import save_checkpoint


def tiny_vit(distilled: bool = True, **kw) -> VisionTransformer:
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=3,
               num_heads=2, distilled=distilled)
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # weights far from init, so every token's attention differs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def manual_vit(model: VisionTransformer, x: torch.Tensor):
    """ViT's forward written out, attention entry by entry with plain loops: the logits
    and each layer's attention matrices [B, heads, N, N] (part of the graph)."""
    cfg = model.cfg
    tokens = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                      stride=cfg.patch_size).flatten(2).transpose(1, 2)
    B = x.shape[0]
    prefix = [model.cls_token.expand(B, -1, -1)]
    if cfg.distilled:
        prefix.append(model.dist_token.expand(B, -1, -1))
    h = torch.cat(prefix + [tokens], 1) + model.pos_embed
    N, D, H = h.shape[1], cfg.embed_dim, cfg.num_heads
    d = D // H
    attentions = []
    for blk in model.blocks:
        y = F.layer_norm(h, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        rows = []
        for b in range(B):
            for head in range(H):
                s = slice(head * d, (head + 1) * d)
                for i in range(N):
                    logits = torch.stack([(q[b, i, s] * k[b, j, s]).sum() * d ** -0.5
                                          for j in range(N)])
                    e = torch.exp(logits - logits.max())
                    rows.append(e / e.sum())
        A = torch.stack(rows).view(B, H, N, N)
        attentions.append(A)
        heads_v = v.view(B, N, H, d).transpose(1, 2)
        out = (A @ heads_v).transpose(1, 2).reshape(B, N, D)
        h = h + out @ blk.attn.proj.weight.T + blk.attn.proj.bias
        y = F.layer_norm(h, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        h = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))
    h = F.layer_norm(h, (D,), model.norm.weight, model.norm.bias, 1e-6)
    logits = model.head(h[:, 0])
    if cfg.distilled:
        logits = (logits + model.head_dist(h[:, 1])) / 2
    return logits, attentions


def reference_map(model, relevance: torch.Tensor) -> torch.Tensor:
    """[N, N] relevance of one image -> the prefix tokens' mean row over the patches,
    upsampled to the 16x16 input (4x4 grid of 4-pixel patches), scaled to [0, 1]."""
    p = 2 if model.cfg.distilled else 1
    grid = relevance[:p, p:].mean(0).view(1, 1, 4, 4)
    up = F.interpolate(grid, size=(16, 16), mode="bilinear")[0, 0]
    return (up - up.min()) / (up.max() - up.min())


@pytest.mark.parametrize("distilled", [True, False])
def test_rollout_and_grad_rollout_equal_references_built_from_the_papers(distilled):
    model = tiny_vit(distilled)
    x = torch.randn(2, 3, 16, 16)
    logits, attentions = manual_vit(model, x)
    assert torch.allclose(logits, model(x), atol=1e-4)
    target = torch.tensor([1, 3])
    score = logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, attentions)
    rollout_maps, grad_maps = explain_batch(model, x, "rollout")[0], \
        explain_batch(model, x, "grad-rollout", target)[0]
    N = attentions[0].shape[-1]
    for b in range(2):
        joint = torch.eye(N)  # Abnar & Zuidema: rownorm((mean_h A + I) / 2), multiplied
        relevance = torch.eye(N)  # Chefer et al.: R += mean_h((grad * A)^+) @ R
        for A, G in zip(attentions, grads, strict=True):
            a = (A[b].mean(0).detach() + torch.eye(N)) / 2
            joint = (a / a.sum(1, keepdim=True)) @ joint
            relevance = relevance + (G[b] * A[b]).detach().clamp(min=0).mean(0) @ relevance
        torch.testing.assert_close(rollout_maps[b], reference_map(model, joint),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad_maps[b], reference_map(model, relevance),
                                   atol=1e-5, rtol=1e-4)
