"""vistra.optimize and the training acceleration give the plain model's answers: the bias
gathered once across sizes and weight updates, the one-gather window layout, fused linears
and SDPA in inference against the autograd paths, in-place residuals, bf16 autocast, and
torch.compile. The plain model runs standard operators and keeps no state; tracers never see
the fast paths; one switch (VISTRA_OPTIMIZE=0) leaves the model plain."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from op_log import OpLog
from torch import nn

import vistra
from vistra.accel import accelerate_training, optimize
from vistra.accel.kernels import FUSED_DTYPES
from vistra.accel.modules import FastLinear
from vistra.models.layers import Mlp, attention
from vistra.models.swin import (
    SwinBlock,
    SwinConfig,
    shift_window_mask,
    window_order,
    window_partition,
    window_reverse,
)

# Narrow but complete: four stages, shifted windows, merging, the last map one window.
SWIN = ("swin_tiny_patch4_window7_224",
        {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)})
VIT = ("vit_tiny_patch16_224", {"depth": 2})


def small(name_kw, **kw):
    torch.manual_seed(0)
    name, arch = name_kw
    return vistra.create_model(name, **arch, **kw)


def optimized(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    return optimize(copy.deepcopy(model), dtype)


def reference_window_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The textbook SW-MSA: pad, roll, partition, softmax(qk^T + B + mask) v, reverse, roll
    back, crop; nothing cached, no gather, no fused kernel."""
    attn, M = block.attn, block.window_size
    B, H, W, C = x.shape
    shift = block.shift_size if min(H, W) > M else 0
    Hp, Wp = H - H % -M, W - W % -M
    x = torch.roll(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)), (-shift, -shift), (1, 2))
    windows = window_partition(x, M)
    qkv = F.linear(windows, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.view(*windows.shape[:3], 3, attn.num_heads, -1).permute(3, 0, 1, 4, 2, 5)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn.relative_position_bias()
    if shift:
        logits = logits + shift_window_mask(Hp, Wp, M, shift)[:, None]
    out = (logits.softmax(-1) @ v).transpose(2, 3).reshape(windows.shape)
    out = window_reverse(F.linear(out, attn.proj.weight, attn.proj.bias), M, Hp, Wp)
    return torch.roll(out, (shift, shift), (1, 2))[:, :H, :W]


@pytest.mark.parametrize("H,W,shift", [(14, 14, 3), (17, 10, 3), (14, 14, 0), (9, 12, 0)])
def test_gathered_windows_equal_the_textbook_form_with_and_without_grad(H, W, shift):
    torch.manual_seed(H + W)
    block = SwinBlock(16, 2, 7, shift, SwinConfig(), 0.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, H, W, 16)
    expected = reference_window_attention(block, x)
    fast = optimized(block)
    with torch.inference_mode():
        torch.testing.assert_close(fast.mix(x), expected, atol=1e-5, rtol=1e-5)
    grad_path = block.shifted_window_attention(x.requires_grad_())  # the plain model's
    torch.testing.assert_close(grad_path, expected, atol=1e-5, rtol=1e-5)
    grad_path.square().sum().backward()
    assert block.attn.relative_position_bias_table.grad.abs().sum() > 0


def test_window_order_is_roll_partition_and_its_inverse_crops():
    H, W, M, s = 10, 9, 4, 2
    x = torch.arange(H * W).view(1, H, W, 1)
    order, restore = window_order(H, W, M, s)
    padded = F.pad(x, (0, 0, 0, 12 - W, 0, 12 - H), value=-1)
    expected = window_partition(torch.roll(padded, (-s, -s), (1, 2)), M).flatten()
    assert torch.equal(padded.flatten()[order], expected)
    assert torch.equal(expected[restore], x.flatten())


def test_cached_bias_follows_weight_updates_and_loading():
    model = optimize(small(SWIN))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        before = model(x)
    with torch.no_grad():
        for block in model.layers[0].blocks:
            block.attn.relative_position_bias_table.add_(0.5)  # an in-place update
    fresh = small(SWIN).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        after = model(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, fresh(x))
    model.load_state_dict(small(SWIN).state_dict())  # copies into the same storage
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before)


def test_an_optimizer_step_changes_the_next_inference():
    model = small(SWIN, img_size=112)
    x = torch.randn(2, 3, 112, 112)
    model.eval()
    with torch.inference_mode():
        before = model(x)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()
    reference = small(SWIN, img_size=112).eval()
    reference.load_state_dict(model.state_dict())
    with torch.inference_mode():
        after = model(x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, reference(x))


@pytest.mark.parametrize("name_kw,size", [(SWIN, 112), (VIT, 224)])
def test_training_acceleration_gives_the_plain_gradients(name_kw, size):
    """Training splits q, k, v into copies with a hand-written backward (SplitHeads); every
    parameter's gradient must equal autograd's through the plain model."""
    plain_model = small(name_kw, img_size=size).train()
    fast_model = accelerate_training(copy.deepcopy(plain_model))
    x = torch.randn(2, 3, size, size)

    def gradients(model):
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast, plain = gradients(fast_model), gradients(plain_model)
    assert fast.keys() == plain.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], msg=name)


@pytest.mark.parametrize("name_kw,size", [(SWIN, 224), (SWIN, (200, 264)), (VIT, 224)])
def test_inference_fast_paths_equal_the_autograd_paths(name_kw, size):
    """The optimized model takes the fused linears, flash attention, cached bias and in-place
    residuals; the plain model with autograd on, the plain layers. Same numbers."""
    model = small(name_kw, img_size=size).eval()
    fast_model = optimized(model)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, h, w)
    with torch.inference_mode():
        fast = fast_model(x)
    plain = model(x)
    assert plain.requires_grad
    torch.testing.assert_close(fast, plain.detach(), atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # after inference_mode, the caches still serve no_grad forwards
        torch.testing.assert_close(fast_model(x), fast, atol=2e-5, rtol=1e-4)


def test_inference_leaves_the_input_and_the_weights_untouched():
    model = optimize(small(VIT))
    x = torch.randn(1, 3, 224, 224)
    x_copy, state = x.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        model(x)
    assert torch.equal(x, x_copy)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fast_linear_is_an_nn_linear_with_the_same_keys_and_hooks_still_fire():
    """Optimizing keeps every module an instance of its class, with the same keys; the plain
    model's hooks see every call (an optimized model's fused kernels skip fc1's)."""
    model = small(VIT).eval()
    fast = optimized(model)
    fc1 = fast.blocks[0].mlp.fc1
    assert isinstance(fc1, nn.Linear) and isinstance(fast.blocks[0].attn.qkv, FastLinear)
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert "blocks.0.mlp.fc1.weight" in fast.state_dict()
    seen = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))
    assert seen == [(1, 197, 576), (1, 197, 768)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_gemm_and_fused_residual_equal_the_plain_layers(dtype):
    """The patch embedding as one GEMM over the cut-out patches (sizes the patch does not
    divide: the conv's floor) and fc2's GEMM adding the residual give the plain layers'
    answers, packed bf16 weights too; a hook on the patch conv still sees its call."""
    if dtype == torch.bfloat16 and torch.bfloat16 not in FUSED_DTYPES:
        pytest.skip("oneDNN has no bf16 here")
    torch.manual_seed(0)
    conv, mlp = nn.Conv2d(3, 16, 4, 4), Mlp(16, 64)
    fast_conv, fast_mlp = optimized(conv, dtype), optimized(mlp, dtype)
    conv, mlp = conv.to(dtype).eval(), mlp.to(dtype).eval()
    image, x, h = torch.randn(2, 3, 18, 21, dtype=dtype), *torch.randn(2, 2, 3, 5, 16, dtype=dtype)
    with torch.inference_mode():
        plain_tokens, plain_sum = conv(image).permute(0, 2, 3, 1), x + mlp(h)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    with torch.inference_mode(), OpLog() as patch_ops:
        tokens = fast_conv(image).permute(0, 2, 3, 1)
    with torch.inference_mode(), OpLog() as mlp_ops:
        total = fast_mlp.residual(x, h)
    assert not any("conv" in name for name in patch_ops.names) and "mkldnn" in patch_ops.namespaces
    assert "mkldnn._linear_pointwise.binary" in mlp_ops.names
    assert not any(name.startswith("aten.add") for name in mlp_ops.names)
    assert tokens.shape == (2, 4, 5, 16) and tokens.is_contiguous()
    torch.testing.assert_close(tokens.float(), plain_tokens.float(), **tol)
    torch.testing.assert_close(total.float(), plain_sum.float(), **tol)
    if dtype == torch.bfloat16:
        assert "packed" in fast_conv._frozen and "packed" in fast_mlp.fc2._frozen
    seen = []
    fast_conv.register_forward_hook(lambda m, i, o: seen.append("conv"))
    mlp.fc2.register_forward_hook(lambda m, i, o: seen.append("fc2"))
    with torch.inference_mode():
        torch.testing.assert_close(fast_conv(image).permute(0, 2, 3, 1).float(),
                                   plain_tokens.float(), **tol)
        torch.testing.assert_close((x + mlp(h)).float(), plain_sum.float(), **tol)
    assert seen == ["conv", "fc2"]


def test_fused_attention_folds_windows_and_matches_the_explicit_path():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 49, 8) for _ in range(3))
    bias = torch.randn(4, 3, 49, 49)
    fused, none = attention(q, k, v, bias, scale=0.3)
    explicit, weights = attention(q, k, v, bias, scale=0.3, fused=False)
    assert none is None
    assert fused.shape == (2, 4, 3, 49, 8) and weights.shape == (2, 4, 3, 49, 49)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name_kw", [SWIN, VIT])
def test_bf16_autocast_stays_close_to_fp32(name_kw):
    model = small(name_kw).eval()
    fast = optimized(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, fast_bf16 = model(x), fast(x)
    assert F.cosine_similarity(fp32.flatten(), bf16.float().flatten(), dim=0) > 0.99
    assert F.cosine_similarity(fp32.flatten(), fast_bf16.float().flatten(), dim=0) > 0.99


def test_bf16_training_step_runs_and_updates_the_bias_table():
    model = accelerate_training(small(SWIN, img_size=112).train())
    table = model.layers[0].blocks[1].attn.relative_position_bias_table
    before = table.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(torch.randn(2, 3, 112, 112)), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(table, before)


FAMILIES = {
    "vit": VIT,
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"depth": 2}),
    "r50_hybrid": ("vit_base_r50_s16_224", {"depth": 1, "embed_dim": 64, "num_heads": 2,
                                            "hybrid_depths": (1, 1, 1), "img_size": 64}),
    "swin": SWIN,
}


def caches(model: nn.Module) -> list:
    """Whatever the model's modules keep between calls."""
    return [c for m in model.modules()
            for c in (getattr(m, "_frozen", None), getattr(m, "_layouts", None)) if c]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_plain_model_gives_the_optimized_answer_with_standard_ops_and_no_state(family):
    model = small(FAMILIES[family]).eval()
    size = model.img_size
    x = torch.randn(2, 3, *size)
    with torch.inference_mode(), OpLog() as plain_ops:
        plain = model(x)
    assert "mkldnn" not in plain_ops.namespaces and not caches(model)
    fast_model = optimized(model)
    with torch.inference_mode(), OpLog() as fast_ops:
        fast = fast_model(x)
    assert "mkldnn" in fast_ops.namespaces  # the check above can fail
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_a_jit_trace_of_an_optimized_model_records_the_plain_path():
    model = optimize(small(SWIN, img_size=64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert not caches(model)
        assert "mkldnn" not in str(traced.inlined_graph)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_environment_variable_leaves_the_model_plain():
    code = ("import vistra, torch; m = vistra.optimize(vistra.create_model("
            "'vit_tiny_patch16_224', depth=1)); print(type(m.blocks[0]).__name__, m.training)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "VISTRA_OPTIMIZE": "0"}, check=True)
    assert out.stdout.strip() == "Block False"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "VISTRA_OPTIMIZE"},
                         check=True)
    assert out.stdout.strip() == "FastBlock False"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VISTRA_TEST_COMPILE") != "1",
                    reason="compiling takes minutes on a small CPU; set VISTRA_TEST_COMPILE=1")
def test_compiled_equals_eager_on_a_tiny_swin():
    model = vistra.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16,
                                depths=(2, 1), num_heads=(1, 2), window_size=4).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(optimized(model))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
