"""vistra.explain's `lrp` (AttnLRP) against two references, in float64:

- lxt's own explicit AttnLRP (`lxt.explicit`, the implementation of the paper's experiments:
  each rule an autograd Function whose backward passes relevance, not gradients), on a tiny
  ViT (patch conv and conv stem) and a tiny Swin (shifted, padded windows, relative position
  bias, patch merging) written out with its functions and vistra's weights. lxt is not in
  the `test` extra: `pip install lxt` pulls in open_clip_torch (with it torchvision and
  timm), bitsandbytes and zennit, and `lxt.efficient` (the gradient x input formulation
  vistra follows) imports its torchvision and transformers 4 model files on import, so it
  does not load beside transformers 5 without torchvision. `pip install lxt --no-deps`
  gives `lxt.explicit`, which needs torch only: the README's test command (and so CI)
  installs it that way; where it is missing those tests skip.
- a layer-by-layer LRP pass written out here (each rule's relevance formula on the stored
  activations, no autograd) on a tiny ViT, which always runs.

Then conservation, the fashion-MNIST presets and the R50 hybrid, and that nothing of the
rules is left on the model after the call. (The model-randomisation check of lrp is
tests/test_explain_perturb.py's, with the other methods on the same trained models.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_explain_perturb import scrambled
from torch import nn

import vistra
import vistra.models.layers as layers
from vistra.explain import default_method, explain_batch, methods_for
from vistra.explain.lrp import attnlrp_rules, relevance
from vistra.models import SwinConfig, SwinTransformer, VisionTransformer, ViTConfig, get_family
from vistra.models.layers import ConvStem, split_heads
from vistra.models.swin import shift_window_mask, window_partition, window_reverse

EPS = 1e-12  # lxt's stabilisers, negligible in float64


def tiny_vit(**kw) -> VisionTransformer:
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
               num_heads=2)
    torch.manual_seed(0)
    return scrambled(VisionTransformer(ViTConfig(**{**cfg, **kw}))).double()


def tiny_swin(**kw) -> SwinTransformer:
    # 36 px: a 9 x 9 map padded to windows of 4, then 5 x 5, both shifted
    cfg = dict(img_size=36, patch_size=4, in_chans=3, num_classes=3, embed_dim=16,
               depths=(2, 2), num_heads=(2, 2), window_size=4)
    torch.manual_seed(0)
    return scrambled(SwinTransformer(SwinConfig(**{**cfg, **kw}))).double()


def image(model: nn.Module, batch: int = 2, size: tuple[int, int] | None = None
          ) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, model.cfg.in_chans, *(size or model.img_size), generator=g,
                       dtype=next(model.parameters()).dtype)


# -- lxt's explicit AttnLRP ------------------------------------------------------------------

class LxtModel:
    """vistra's ViT and Swin forward written with lxt.explicit's rules and their weights."""

    def __init__(self, model: nn.Module) -> None:
        self.lf = pytest.importorskip("lxt.explicit.functional")
        self.rules = pytest.importorskip("lxt.explicit.rules")
        self.model = model

    def linear(self, x, layer: nn.Linear):
        return self.lf.linear_epsilon(x, layer.weight, layer.bias, EPS)

    def add(self, a, b):
        return self.lf.add2(a, b, epsilon=EPS)

    def norm(self, x, layer: nn.LayerNorm):
        return self.lf.layer_norm_grad_fn.apply(x, layer.weight, layer.bias, layer.eps, EPS)

    def stem(self, embed: nn.Module, x):
        """The patch conv, or the conv stem's conv, BatchNorm and ReLU, and its 1x1 conv."""
        if embed.backbone is not None:
            assert isinstance(embed.backbone, ConvStem)
            for layer in embed.backbone.layers:
                if isinstance(layer, nn.ReLU):
                    x = self.rules.identity(F.relu, x)
                else:  # conv, BatchNorm in evaluation: epsilon rule
                    x = self.rules.epsilon_lrp(layer, EPS, x)
        return self.rules.epsilon_lrp(embed.proj, EPS, x)

    def attention(self, attn: layers.Attention, h, mask=None):
        *lead, N, C = h.shape
        q, k, v = split_heads(self.linear(h, attn.qkv), attn.num_heads)
        logits = self.lf.matmul(self.lf.mul2(q, attn.scale), k.transpose(-2, -1),
                                epsilon=EPS)
        bias = attn.position_bias()
        if mask is not None:
            bias = mask[:, None] if bias is None else bias + mask[:, None]
        if bias is not None:
            logits = self.add(logits, bias.expand(logits.shape))
        out = self.lf.matmul(self.lf.softmax(logits, -1), v, epsilon=EPS)
        out = out.transpose(len(lead), len(lead) + 1).reshape(*lead, N, C)
        return self.linear(out, attn.proj)

    def mlp(self, mlp: layers.Mlp, h):
        return self.linear(self.rules.identity(F.gelu, self.linear(h, mlp.fc1)), mlp.fc2)

    def vit(self, x):
        m = self.model
        t = self.stem(m.patch_embed, x).flatten(2).transpose(1, 2)
        t = torch.cat([m.cls_token.expand(len(x), -1, -1), t], 1)
        t = self.add(t, m.pos_embed.expand_as(t))
        for block in m.blocks:
            t = self.add(t, self.attention(block.attn, self.norm(t, block.norm1)))
            t = self.add(t, self.mlp(block.mlp, self.norm(t, block.norm2)))
        return self.linear(self.norm(t, m.norm)[:, 0], m.head)

    def windows(self, block, h):
        """SwinBlock.shifted_window_attention, with lxt's attention."""
        B, H, W, C = h.shape
        M = block.window_size
        shift = block.shift_size if min(H, W) > M else 0
        h = F.pad(h, (0, 0, 0, -W % M, 0, -H % M))
        Hp, Wp = h.shape[1:3]
        h = torch.roll(h, (-shift, -shift), (1, 2))
        mask = (shift_window_mask(Hp, Wp, M, shift).to(h.dtype) if shift else None)
        out = window_reverse(self.attention(block.attn, window_partition(h, M), mask), M, Hp, Wp)
        return torch.roll(out, (shift, shift), (1, 2))[:, :H, :W]

    def swin(self, x):
        m = self.model
        t = self.norm(self.stem(m.patch_embed, x).permute(0, 2, 3, 1), m.patch_embed.norm)
        for stage in m.layers:
            if stage.downsample is not None:
                B, H, W, C = t.shape
                t = F.pad(t, (0, 0, 0, W % 2, 0, H % 2))
                H, W = H + H % 2, W + W % 2
                t = t.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)
                t = t.reshape(B, H // 2, W // 2, 4 * C)
                t = self.linear(self.norm(t, stage.downsample.norm), stage.downsample.reduction)
            for block in stage.blocks:
                t = self.add(t, self.windows(block, self.norm(t, block.norm1)))
                t = self.add(t, self.mlp(block.mlp, self.norm(t, block.norm2)))
        t = self.norm(t, m.norm)
        pooled = self.lf.mean(t.reshape(len(t), -1, t.shape[-1]), 1, False, epsilon=EPS)
        return self.linear(pooled, m.head)

    def relevance(self, x, target):
        """The input's relevance for the target's logit, and the logits."""
        x = x.detach().requires_grad_(True)
        forward = self.swin if isinstance(self.model, SwinTransformer) else self.vit
        logits = forward(x)
        start = torch.zeros_like(logits).scatter(1, target[:, None], 1) * logits
        logits.backward(start.detach())
        return x.grad, logits.detach()


@pytest.mark.parametrize("make", [
    lambda: tiny_vit(),
    lambda: tiny_vit(img_size=32, patch_size=8, conv_stem=(8, 8, 8)),
    lambda: tiny_swin(),
    lambda: tiny_swin(img_size=32, conv_stem=(8, 8)),
])
def test_relevance_equals_lxts_explicit_attnlrp(make):
    """The same logits from lxt's functions, and the same relevance to 1e-4 of the largest."""
    model = make()
    lxt = LxtModel(model)
    x, target = image(model), torch.tensor([1, 2])
    theirs, their_logits = lxt.relevance(x, target)
    ours, logits = relevance(model, x, target)
    torch.testing.assert_close(their_logits, logits, rtol=1e-9, atol=1e-9)  # same function
    scale = theirs.abs().amax((1, 2, 3), keepdim=True)
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-4)
    assert (ours.flatten(1).norm(dim=1) > 0).all()


# -- a layer-by-layer LRP pass, no autograd ----------------------------------------------------

def epsilon_linear(a, weight, bias, relevance_out):
    """Epsilon rule (epsilon -> 0, the bias absorbing its share)."""
    z = F.linear(a, weight, bias)
    return a * ((relevance_out / z) @ weight)


def epsilon_add(a, b, relevance_out):
    return a / (a + b) * relevance_out, b / (a + b) * relevance_out


def layer_norm_identity(a, norm: nn.LayerNorm, relevance_out):
    """y = (a - mean) / std * w + b with std a constant: a * J^T (R / y)."""
    std = (a.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    y = (a - a.mean(-1, keepdim=True)) / std * norm.weight + norm.bias
    r = relevance_out / y * norm.weight / std
    return a * (r - r.mean(-1, keepdim=True))


def uniform_matmul(a, b, relevance_out):
    """Epsilon rule over the products, then half of each to each operand."""
    r = relevance_out / (2 * (a @ b))
    return a * (r @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ r)


def softmax_taylor(logits, weights, relevance_out):
    return logits * (relevance_out - weights * relevance_out.sum(-1, keepdim=True))


def brute_force_vit(model: VisionTransformer, x, target):
    """A plain ViT (patch conv, class token) forward keeping every activation, then the
    relevance carried back through it rule by rule."""
    B, p = len(x), model.patch_embed.reduction
    conv = model.patch_embed.proj
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # [B, N, C p p]
    embedded = F.linear(patches, conv.weight.flatten(1), conv.bias)
    tokens = torch.cat([model.cls_token.expand(B, -1, -1), embedded], 1)
    pos = model.pos_embed.expand_as(tokens)
    t, kept = tokens + pos, []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        h1 = block.norm1(t)
        q, k, v = split_heads(attn.qkv(h1), attn.num_heads)
        qs, kt = q * attn.scale, k.transpose(-2, -1)
        logits = qs @ kt
        weights = logits.softmax(-1)
        o = (weights @ v).transpose(1, 2).flatten(2)
        a_out = attn.proj(o)
        mid = t + a_out
        h2 = block.norm2(mid)
        u = mlp.fc1(h2)
        g = F.gelu(u)
        m_out = mlp.fc2(g)
        kept.append(dict(t=t, h1=h1, qs=qs, kt=kt, v=v, logits=logits, weights=weights, o=o,
                         a_out=a_out, mid=mid, h2=h2, g=g, m_out=m_out))
        t = mid + m_out
    final = model.norm(t)
    logits = model.head(final[:, 0])

    start = torch.zeros_like(logits).scatter(1, target[:, None], 1) * logits
    r_final = torch.zeros_like(final)
    r_final[:, 0] = epsilon_linear(final[:, 0], model.head.weight, model.head.bias, start)
    r = layer_norm_identity(t, model.norm, r_final)
    for block, a in zip(reversed(model.blocks), reversed(kept), strict=True):
        r_mid, r_m = epsilon_add(a["mid"], a["m_out"], r)
        mlp, attn = block.mlp, block.attn
        r_g = epsilon_linear(a["g"], mlp.fc2.weight, mlp.fc2.bias, r_m)  # GELU: identity
        r_h2 = epsilon_linear(a["h2"], mlp.fc1.weight, mlp.fc1.bias, r_g)
        r_mid = r_mid + layer_norm_identity(a["mid"], block.norm2, r_h2)
        r_t, r_a = epsilon_add(a["t"], a["a_out"], r_mid)
        r_o = epsilon_linear(a["o"], attn.proj.weight, attn.proj.bias, r_a)
        r_o = r_o.view(B, -1, block.attn.num_heads, a["v"].shape[-1]).transpose(1, 2)
        r_weights, r_v = uniform_matmul(a["weights"], a["v"], r_o)
        r_logits = softmax_taylor(a["logits"], a["weights"], r_weights)
        r_q, r_kt = uniform_matmul(a["qs"], a["kt"], r_logits)  # q * scale: identity
        r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4)
        r_qkv = r_qkv.reshape(B, -1, 3 * a["o"].shape[-1])
        r_h1 = epsilon_linear(a["h1"], attn.qkv.weight, attn.qkv.bias, r_qkv)
        r = r_t + layer_norm_identity(a["t"], block.norm1, r_h1)
    r_tokens, _ = epsilon_add(tokens, pos, r)
    r_patches = epsilon_linear(patches, conv.weight.flatten(1), conv.bias,
                               r_tokens[:, model.num_prefix_tokens:])
    return F.fold(r_patches.transpose(1, 2), x.shape[-2:], p, stride=p), logits


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_relevance_equals_a_layer_by_layer_lrp_pass(size):
    """On a square and a non-square input, to 1e-4 of the largest relevance."""
    model = tiny_vit(img_size=size)
    x, target = image(model), torch.tensor([3, 0])
    with torch.no_grad():
        theirs, their_logits = brute_force_vit(model, x, target)
    ours, logits = relevance(model, x, target)
    torch.testing.assert_close(their_logits, logits, rtol=1e-9, atol=1e-9)
    scale = theirs.abs().amax((1, 2, 3), keepdim=True)
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-4)


# -- conservation ----------------------------------------------------------------------------

def bias_free(model: nn.Module) -> nn.Module:
    """Every additive constant zero (biases, position embeddings, class token, BatchNorm's
    running mean): what reaches the input is then all the logit's relevance but what the
    softmax rule moves."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("bias", "pos_embed", "cls_token", "dist_token"):
                p.zero_()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
    return model


@pytest.mark.parametrize("make", [
    lambda: tiny_vit(),
    lambda: tiny_vit(distilled=True, representation_size=16),
    lambda: tiny_vit(img_size=32, patch_size=8, conv_stem=(8, 8, 8)),
    lambda: tiny_vit(img_size=64, embed_dim=8, depth=1, hybrid_depths=(1, 1, 1)),
    lambda: tiny_swin(),
])
def test_relevance_is_conserved_but_for_the_softmax_rules_share(make, monkeypatch):
    """AttnLRP's rules conserve relevance (linear maps without bias, the identity rules, the
    uniform rule) except the softmax's, x (R - s sum R) (the paper's Prop. 3.1): on a
    bias-free model the input's relevance is the logit less, in each attention, what the
    rule adds or drops, R(attention weights) - R(q k^T)."""
    model = bias_free(make())
    moved = []

    def keeping_what_the_softmax_moves(q, k, v, bias=None, *, scale, dropout_p=0.0, fused=True):
        products = (q * scale) @ k.transpose(-2, -1)
        logits = products if bias is None else products + bias
        weights = logits.softmax(-1)
        # gradients seen here are the plain ones: the rules' halves are taken at q, k, v
        logits.register_hook(lambda g: moved.append(-0.5 * (products * g).sum((-3, -2, -1))
                                                    .reshape(len(g), -1).sum(1)))
        weights.register_hook(lambda g: moved.append(0.5 * (weights * g).sum((-3, -2, -1))
                                                     .reshape(len(g), -1).sum(1)))
        return weights @ v, weights

    monkeypatch.setattr(layers, "attention", keeping_what_the_softmax_moves)
    x, target = image(model), torch.tensor([1, 0])
    ours, logits = relevance(model, x, target)
    softmax_share = torch.stack(moved).sum(0)
    total = logits.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(ours.sum((1, 2, 3)), total - softmax_share, rtol=1e-9,
                               atol=1e-9)
    assert (softmax_share.abs() > 1e-6).all()  # the accounting has something to account for


# -- the models people train -----------------------------------------------------------------

@pytest.mark.parametrize("name,size", [
    ("vit_fmnist", None), ("vit_fmnist", (28, 36)), ("swin_fmnist", None),
    ("swin_fmnist", (36, 28)), ("hybrid", None), ("hybrid", (64, 96)),
])
def test_maps_of_the_presets_and_the_hybrid(name, size):
    """The recipe architectures (conv stems, BatchNorm) and an R50 hybrid (GroupNorm, SAME
    padding, max-pool) at their sizes and on a non-square input: a map over the pixels, in
    [0, 1], that varies, from one backward; the logits are the model's."""
    torch.manual_seed(0)
    if name == "hybrid":
        model = vistra.create_model("vit_base_r50_s16_224", depth=1, embed_dim=32,
                                    num_heads=2, hybrid_depths=(1, 1, 1), img_size=64,
                                    num_classes=4)
    else:
        model = vistra.create_model(name)
    model = scrambled(model)
    x = torch.randn(2, model.cfg.in_chans, *(size or model.img_size))
    with get_family(model).resizable(model):
        maps, logits = explain_batch(model, x, "lrp")
        with torch.no_grad():
            torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    assert maps.shape == (2, *x.shape[-2:])
    assert torch.isfinite(maps).all() and (maps.flatten(1).std(1) > 0.01).all()


def test_lrp_is_listed_after_the_families_defaults():
    for model in (tiny_vit(), tiny_swin()):
        family = get_family(model)
        assert family.explain_methods[-1] == "lrp" and "lrp" in methods_for(model)
        assert default_method(model) == "rise"


# -- nothing left behind ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: tiny_vit(representation_size=16),
    lambda: tiny_swin(),
    lambda: tiny_vit(img_size=64, embed_dim=8, depth=1, hybrid_depths=(1, 1, 1)),
])
def test_the_rules_hold_only_during_the_call(make):
    """After the call, and after a call that fails inside the rules, the model has the same
    modules, parameters and buffers, no instance attribute of the rules, and its own
    gradients."""
    model = make()
    x = image(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m)) for name, m in model.named_modules()]
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    def plain_gradient():
        y = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(y)[:, 0].sum(), y)
        return grad

    with torch.no_grad():
        logits = model(x)
    gradient = plain_gradient()

    def unchanged():
        assert [(name, type(m)) for name, m in model.named_modules()] == modules
        assert all(dict(vars(m)) == attributes[name] for name, m in model.named_modules())
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)

    with attnlrp_rules(model):
        assert any("forward" in vars(m) for m in model.modules())
    unchanged()
    explain_batch(model, x, "lrp")
    unchanged()
    with pytest.raises(ValueError, match="channels"), attnlrp_rules(model):
        model(x[:, :1])
    unchanged()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    torch.testing.assert_close(plain_gradient(), gradient, rtol=0, atol=0)
    with attnlrp_rules(model):  # the rules' gradient is another
        assert not torch.allclose(plain_gradient(), gradient)
