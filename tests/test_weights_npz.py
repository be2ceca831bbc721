"""Google's ViT / R50+ViT .npz files, and the hybrid backbone computing exactly what Google's
Flax code computes (SAME padding, weight standardisation, GroupNorm eps)."""

import numpy as np
import pytest
import torch

import vistra
from vistra.models.resnetv2 import Bottleneck, Stem
from vistra.weights import load_pretrained

# --- an independent vistra -> Flax mapping, written from vit_jax's module names -------------


def _np(t):
    return t.detach().numpy().copy()


def _conv(w):  # OIHW -> HWIO
    return _np(w).transpose(2, 3, 1, 0)


def google_arrays(model) -> dict:
    sd, cfg = model.state_dict(), model.arch
    D, H = cfg.embed_dim, cfg.num_heads
    out = {
        "cls": _np(sd["cls_token"]),
        "embedding/kernel": _conv(sd["patch_embed.proj.weight"]),
        "embedding/bias": _np(sd["patch_embed.proj.bias"]),
        "Transformer/posembed_input/pos_embedding": _np(sd["pos_embed"]),
        "Transformer/encoder_norm/scale": _np(sd["norm.weight"]),
        "Transformer/encoder_norm/bias": _np(sd["norm.bias"]),
        "head/kernel": _np(sd["head.weight"]).T,
        "head/bias": _np(sd["head.bias"]),
    }
    if "pre_logits.fc.weight" in sd:
        out["pre_logits/kernel"] = _np(sd["pre_logits.fc.weight"]).T
        out["pre_logits/bias"] = _np(sd["pre_logits.fc.bias"])
    for i in range(cfg.depth):
        g, v = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for flax_ln, ours in [("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")]:
            out[f"{g}{flax_ln}/scale"] = _np(sd[f"{v}{ours}.weight"])
            out[f"{g}{flax_ln}/bias"] = _np(sd[f"{v}{ours}.bias"])
        qkv_w, qkv_b = _np(sd[f"{v}attn.qkv.weight"]), _np(sd[f"{v}attn.qkv.bias"])
        for j, name in enumerate(["query", "key", "value"]):
            rows = slice(j * D, (j + 1) * D)
            out[f"{g}MultiHeadDotProductAttention_1/{name}/kernel"] = (
                qkv_w[rows].T.reshape(D, H, D // H))
            out[f"{g}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[rows].reshape(H, D // H)
        out[f"{g}MultiHeadDotProductAttention_1/out/kernel"] = (
            _np(sd[f"{v}attn.proj.weight"]).T.reshape(H, D // H, D))
        out[f"{g}MultiHeadDotProductAttention_1/out/bias"] = _np(sd[f"{v}attn.proj.bias"])
        for r in range(2):
            out[f"{g}MlpBlock_3/Dense_{r}/kernel"] = _np(sd[f"{v}mlp.fc{r + 1}.weight"]).T
            out[f"{g}MlpBlock_3/Dense_{r}/bias"] = _np(sd[f"{v}mlp.fc{r + 1}.bias"])
    if cfg.hybrid_depths:
        bb = "patch_embed.backbone."
        out["conv_root/kernel"] = _conv(sd[bb + "stem.conv.weight"])
        out["gn_root/scale"] = _np(sd[bb + "stem.norm.weight"])
        out["gn_root/bias"] = _np(sd[bb + "stem.norm.bias"])
        for s, depth in enumerate(cfg.hybrid_depths):
            for u in range(depth):
                g, v = f"block{s + 1}/unit{u + 1}/", f"{bb}stages.{s}.blocks.{u}."
                pairs = [(f"conv{r}", f"gn{r}", f"conv{r}", f"norm{r}") for r in (1, 2, 3)]
                if f"{v}downsample.conv.weight" in sd:
                    pairs.append(("conv_proj", "gn_proj", "downsample.conv", "downsample.norm"))
                for conv, gn, our_conv, our_norm in pairs:
                    out[f"{g}{conv}/kernel"] = _conv(sd[f"{v}{our_conv}.weight"])
                    out[f"{g}{gn}/scale"] = _np(sd[f"{v}{our_norm}.weight"])
                    out[f"{g}{gn}/bias"] = _np(sd[f"{v}{our_norm}.bias"])
    return out


def assert_same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("root", ["", "opt/target/"])
def test_vit_npz_with_pre_logits_loads_and_matches(tmp_path, root):
    torch.manual_seed(0)
    kw = dict(depth=2, representation_size=192, num_classes=11)
    source = vistra.create_model("vit_tiny_patch16_224", **kw)
    np.savez(tmp_path / "ViT-Ti_16.npz", **{root + k: v for k, v in google_arrays(source).items()})
    model = vistra.create_model("vit_tiny_patch16_224", **kw)
    report = load_pretrained(model, tmp_path / "ViT-Ti_16.npz")
    assert report.layout == "Google ViT .npz" and not report.changes
    assert_same_outputs(model, source, 224)


def test_r50_hybrid_npz_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    kw = dict(depth=1, img_size=64, num_classes=4, hybrid_depths=(2, 1, 1))
    source = vistra.create_model("vit_base_r50_s16_224", **kw)
    np.savez(tmp_path / "R50+ViT-B_16.npz", **google_arrays(source))
    model = vistra.create_model("vit_base_r50_s16_224", pretrained=tmp_path / "R50+ViT-B_16.npz",
                                **kw)
    assert_same_outputs(model, source, 64)


# --- Google's hybrid semantics, written in numpy after vit_jax/models_resnet.py -------------


def flax_std_conv(x, w_hwio, stride):
    """StdConv: kernel (w - mean) / (std + 1e-5) over H, W, I; Flax Conv padding 'SAME'."""
    w = w_hwio - w_hwio.mean(axis=(0, 1, 2))
    w = w / (w.std(axis=(0, 1, 2)) + 1e-5)
    k = w.shape[0]
    x = same_pad(x, k, stride, 0.0)
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride,
                                                                                ::stride]
    return np.einsum("nhwcij,ijco->nhwo", windows, w)


def same_pad(x, k, stride, value):
    pads = [(0, 0)]
    for n in x.shape[1:3]:
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)], constant_values=value)


def flax_group_norm(x, scale, bias, groups=32, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def flax_max_pool_same(x, k=3, stride=2):
    x = same_pad(x, k, stride, -np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return windows[:, ::stride, ::stride].max(axis=(-2, -1))


def relu(x):
    return np.maximum(x, 0)


def nhwc(t):
    return t.detach().double().numpy().transpose(0, 2, 3, 1)


def hwio(conv):
    return conv.weight.detach().double().numpy().transpose(2, 3, 1, 0)


def gn(x, norm):
    return flax_group_norm(x, norm.weight.detach().double().numpy(),
                           norm.bias.detach().double().numpy())


def tiny_scale(module):
    """Kernels and inputs small enough that both eps values matter: a wrong one shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(1e-3)
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)


def test_stem_computes_googles_root_block():
    torch.manual_seed(0)
    stem = Stem(3, 64).double()
    tiny_scale(stem)
    x = torch.randn(1, 3, 33, 38, dtype=torch.float64) * 1e-3  # odd: asymmetric SAME padding
    ref = relu(gn(flax_std_conv(nhwc(x), hwio(stem.conv), 2), stem.norm))
    ref = flax_max_pool_same(ref)
    with torch.no_grad():
        np.testing.assert_allclose(nhwc(stem(x)), ref, rtol=1e-6, atol=1e-9)


def test_strided_bottleneck_computes_googles_residual_unit():
    torch.manual_seed(0)
    block = Bottleneck(64, 256, stride=2).double()
    tiny_scale(block)
    x = torch.randn(1, 64, 9, 12, dtype=torch.float64) * 1e-3
    xn = nhwc(x)
    residual = gn(flax_std_conv(xn, hwio(block.downsample.conv), 2), block.downsample.norm)
    y = relu(gn(flax_std_conv(xn, hwio(block.conv1), 1), block.norm1))
    y = relu(gn(flax_std_conv(y, hwio(block.conv2), 2), block.norm2))
    y = gn(flax_std_conv(y, hwio(block.conv3), 1), block.norm3)
    with torch.no_grad():
        np.testing.assert_allclose(nhwc(block(x)), relu(residual + y), rtol=1e-6, atol=1e-9)
