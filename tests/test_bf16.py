"""bf16 inference with the model cast once by vistra.optimize, and the bf16 attention kernels
of vistra.accel: the same numbers as fp32 within bf16's precision, and the packed weights
never stale."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from op_log import OpLog

import vistra.accel.attention
from vistra.accel import optimize
from vistra.accel.attention import RecomputedAttention, cpu_attention
from vistra.accel.capabilities import Capabilities
from vistra.accel.kernels import FUSED_DTYPES
from vistra.accel.modules import FastLinear
from vistra.models import SwinConfig, SwinTransformer, VisionTransformer, ViTConfig

needs_onednn_bf16 = pytest.mark.skipif(
    torch.bfloat16 not in FUSED_DTYPES,
    reason="oneDNN has no bf16 kernels on this CPU (no AVX512)")


def with_amx(amx: bool, monkeypatch) -> None:
    """The capability probe answering as a CPU with (or without) AMX."""
    flags = frozenset({"avx512_bf16"} | ({"amx_tile", "amx_bf16"} if amx else set()))
    monkeypatch.setattr(vistra.accel.attention, "probe",
                        lambda: Capabilities("test CPU", flags, 2))


def tiny_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=4, num_classes=7, embed_dim=48,
                                      depth=3, num_heads=3))
    swin = SwinTransformer(SwinConfig(img_size=32, patch_size=2, num_classes=7, embed_dim=24,
                                      depths=(2, 2), num_heads=(2, 4), window_size=4))
    for model in (vit, swin):  # weights far from init, so logits spread
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return [vit.eval(), swin.eval()]


@needs_onednn_bf16
@pytest.mark.parametrize("index", [0, 1], ids=["vit", "swin"])
def test_bf16_model_matches_fp32_and_the_plain_bf16_path(index):
    fp32 = tiny_models()[index]
    x = torch.randn(8, 3, 32, 32)
    model = optimize(copy.deepcopy(fp32), torch.bfloat16)
    plain_model = copy.deepcopy(fp32).bfloat16()  # SDPA, ordinary nn.Linear, no packed weights
    with torch.inference_mode():
        reference = fp32(x)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        fast = model(x.bfloat16())
        plain = plain_model(x.bfloat16())
    assert fast.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (fast.float() - reference).abs().max() < 0.03 * scale
    assert (fast.float() - plain.float()).abs().max() < 0.03 * scale
    assert (fast.float().argmax(1) == reference.argmax(1)).float().mean() >= 0.75
    packed = [m for m in model.modules() if isinstance(m, FastLinear) and m._frozen]
    assert packed, "the bf16 model's linear layers took their packed weights"


@needs_onednn_bf16
def test_packed_weight_follows_every_change_of_the_weight():
    torch.manual_seed(0)
    linear = optimize(torch.nn.Linear(32, 16), torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)

    def expected() -> torch.Tensor:
        return F.linear(x.float(), linear.weight.float(), linear.bias.float())

    with torch.inference_mode():
        first = linear(x)
    torch.testing.assert_close(first.float(), expected(), atol=0.05, rtol=0.02)
    with torch.no_grad():
        linear.weight.mul_(-2)  # in place: a new version
    with torch.inference_mode():
        torch.testing.assert_close(linear(x).float(), expected(), atol=0.1, rtol=0.02)
    linear.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.zeros(16)})
    with torch.inference_mode():
        torch.testing.assert_close(linear(x).float(), expected(), atol=0.1, rtol=0.02)
    linear.float()  # a cast drops the packed copy; fp32 input runs the fp32 path
    assert not linear._frozen
    with torch.inference_mode():
        torch.testing.assert_close(linear(x.float()), expected(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("tokens,with_bias", [(49, True), (49, False), (197, False)])
def test_bf16_inference_attention_equals_the_fp32_maths(tokens, with_bias, amx, monkeypatch):
    """Swin's windows (with a bias) and ViT's tokens, on the explicit bf16 products (a CPU
    without AMX) and on SDPA's flash kernel (with AMX)."""
    with_amx(amx, monkeypatch)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, tokens, 16) for _ in range(3))
    bias = torch.randn(3, 4, tokens, tokens) if with_bias else None
    reference = torch.softmax(q @ k.transpose(-2, -1) * 0.25 + (bias if with_bias else 0),
                              -1) @ v
    with torch.inference_mode(), OpLog() as ops:
        out = cpu_attention(*(t.bfloat16() for t in (q, k, v)), bias, scale=0.25)
    assert out.dtype == torch.bfloat16
    assert any("scaled_dot_product" in name for name in ops.names) == amx
    torch.testing.assert_close(out.float(), reference, atol=0.03, rtol=0.03)


def test_recomputed_attention_gradients_equal_autograd():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: RecomputedAttention.apply(a, b, c, 0.5),
                                    (q, k, v))


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_training_attention_saves_no_probabilities_and_matches_fp32(amx, monkeypatch):
    """Training takes the recomputed explicit products on either CPU (the flash kernel's
    backward is the slower one even with AMX)."""
    with_amx(amx, monkeypatch)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t), OpLog() as ops:
        out = cpu_attention(qb, kb, vb, None, scale=0.3)
    assert not any("scaled_dot_product" in name for name in ops.names)
    assert torch.Size([2, 3, 50, 50]) not in saved  # only q, k, v are kept for backward
    out.float().pow(2).sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    (torch.softmax(qr @ kr.transpose(-2, -1) * 0.3, -1) @ vr).pow(2).sum().backward()
    for got, want in ((qb, qr), (kb, kr), (vb, vr)):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=0.1, rtol=0.05)


def test_bf16_window_attention_in_training_has_the_fp32_gradients():
    """Swin training under autocast: the bias (the relative-position table's gather) needs a
    gradient, so the explicit products run under autograd in bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 49, 16) for _ in range(3))
    table = torch.randn(3, 4, 49, 49)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    tb = table.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_attention(qb, kb, vb, tb * 1.0, scale=0.25)
    out.float().pow(2).sum().backward()
    qr, kr, vr, tr = (t.clone().requires_grad_() for t in (q, k, v, table))
    (torch.softmax(qr @ kr.transpose(-2, -1) * 0.25 + tr, -1) @ vr).pow(2).sum().backward()
    for got, want in ((qb, qr), (kb, kr), (vb, vr), (tb, tr)):
        assert got.grad.shape == want.grad.shape
        torch.testing.assert_close(got.grad.float(), want.grad, atol=0.25, rtol=0.05)
