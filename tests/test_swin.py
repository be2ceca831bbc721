"""Swin: shifted windows against a brute-force reference, index formula, merging order."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vistra
from vistra.models.swin import PatchMerging, SwinBlock, SwinConfig, relative_position_index


def brute_force_window_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Token by token, over the windows of the padded map shifted by s: a window's rows are
    [0, s), [s, s + M), [s + M, s + 2M), ... (same for columns); two tokens attend to each
    other iff they are in the same shifted window. No roll, no mask."""
    attn = block.attn
    B, H, W, C = x.shape
    M = block.window_size
    s = block.shift_size if min(H, W) > M else 0
    Hp, Wp = H + (-H % M), W + (-W % M)
    xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    heads, hd = attn.num_heads, C // attn.num_heads
    qkv = F.linear(xp, attn.qkv.weight, attn.qkv.bias).view(B, Hp, Wp, 3, heads, hd)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    table = attn.relative_position_bias_table
    out = torch.zeros(B, Hp, Wp, heads, hd, dtype=torch.float64)

    def window_id(r, c):
        return ((r - s + M) // M, (c - s + M) // M)

    for r in range(Hp):
        for c in range(Wp):
            members = [(r2, c2) for r2 in range(Hp) for c2 in range(Wp)
                       if window_id(r2, c2) == window_id(r, c)]
            for h in range(heads):
                logits = []
                for r2, c2 in members:
                    idx = (r - r2 + M - 1) * (2 * M - 1) + (c - c2 + M - 1)
                    dot = (q[:, r, c, h].double() * k[:, r2, c2, h].double()).sum(-1)
                    logits.append(dot * attn.scale + table[idx, h].double())
                p = torch.stack(logits, -1).softmax(-1)
                vals = torch.stack([v[:, r2, c2, h].double() for r2, c2 in members], 1)
                out[:, r, c, h] = (p[:, :, None] * vals).sum(1)
    out = out.reshape(B, Hp, Wp, C).float()
    return F.linear(out, attn.proj.weight, attn.proj.bias)[:, :H, :W]


@pytest.mark.parametrize("H,W,window,shift", [
    (8, 8, 4, 2),     # plain shifted windows
    (10, 7, 4, 2),    # padding on both axes
    (9, 12, 3, 1),    # odd window, padding on one axis
    (6, 6, 3, 0),     # W-MSA, no shift
    (5, 6, 7, 3),     # the window covers the map: no shift even though one was asked
])
def test_shifted_window_attention_equals_brute_force(H, W, window, shift):
    torch.manual_seed(H * W + window)
    cfg = SwinConfig()
    block = SwinBlock(dim=8, num_heads=2, window=window, shift=shift, cfg=cfg, drop_path=0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1)
        x = torch.randn(2, H, W, 8)
        expected = brute_force_window_attention(block, x)
        actual = block.shifted_window_attention(x)  # the model's roll, partition, reverse
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    fast = vistra.optimize(copy.deepcopy(block))  # one gather each way, layouts kept
    with torch.inference_mode():
        torch.testing.assert_close(fast.mix(x), expected, atol=1e-5, rtol=1e-5)


def test_relative_position_index_follows_the_formula():
    M = 5
    index = relative_position_index(M)
    coords = [(r, c) for r in range(M) for c in range(M)]
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            assert index[i, j] == (ri - rj + M - 1) * (2 * M - 1) + (ci - cj + M - 1)


def test_patch_merging_takes_subgrids_in_the_paper_order_and_pads_odd_sizes():
    merge = PatchMerging(dim=1)
    seen = {}
    merge.norm.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    x = torch.arange(1, 5 * 3 + 1, dtype=torch.float32).view(1, 5, 3, 1)
    out = merge(x)
    assert out.shape == (1, 3, 2, 2)
    grid = F.pad(x[0, :, :, 0], (0, 1, 0, 1))  # 6 x 4, zeros at the bottom and right
    expected = torch.stack([grid[0::2, 0::2], grid[1::2, 0::2], grid[0::2, 1::2],
                            grid[1::2, 1::2]], -1)
    torch.testing.assert_close(seen["x"][0], expected)


@pytest.mark.parametrize("size", [224, 256, (300, 200), 384, (97, 61)])
def test_swin_runs_at_any_size(size):
    model = vistra.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2)).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        assert model(torch.randn(1, 3, h, w)).shape == (1, 1000)


def test_last_stage_at_224_uses_one_window_and_no_shift():
    model = vistra.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2))
    last = model.layers[3].blocks
    assert [b.shift_size for b in last] == [0, 0]
    assert [b.shift_size for b in model.layers[0].blocks] == [0, 3]
    small = vistra.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2, 2, 2))
    assert small.layers[3].blocks[0].window_size == 4  # 112 / 32 rounds up to a 4x4 map


def test_cached_masks_give_the_same_output_across_resolutions():
    torch.manual_seed(0)
    model = vistra.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2)).eval()
    a, b = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        first_a, first_b = model(a), model(b)
        torch.testing.assert_close(model(a), first_a)
        torch.testing.assert_close(model(b), first_b)
    fresh = vistra.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2)).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(b), first_b)


def test_state_dict_holds_no_resolution_dependent_buffers():
    model = vistra.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2))
    keys = model.state_dict().keys()
    assert not [k for k in keys if "relative_position_index" in k or "attn_mask" in k]
